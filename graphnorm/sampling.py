"""The sampled fallback: output moments of an op without a closed-form rule, from Gaussian samples.

For a node whose op has no moment rule (or whose rule declines the call, e.g. division by a random tensor),
each random input with per-unit moments ``(m, v)`` is replaced by K samples ``x_k = m + sqrt(v) z_k``, the op is
run on them (batched with ``torch.func.vmap``, so Python inside the op sees the batch size of ``input_shape``),
and the output's per-unit mean and variance are the sample moments of ``y_k``.

The standard normals ``z_k`` are *common random numbers*: drawn once per node and input from a generator
seeded by the node's name, then reused at every pass. The statistics are therefore a deterministic,
differentiable function of the parameters (the reparameterization trick: ``dy_k/dm``, ``dy_k/dv`` flow through
``x_k``), and a training step sees the same function every time. Two variance reductions make the estimate
exact where it can be: the draws are antithetic (``z_{K/2+k} = -z_k``, so every odd moment of z is 0) and
standardized per unit (their second moment is exactly 1), so an op that is affine in its input gets exactly
the moments of the closed-form rule, and the error of a nonlinear op comes from its curvature only.

Assumptions, as for the closed-form rules: inputs Gaussian per unit, units independent, and distinct random
inputs of one node independent of each other (the same input used twice shares its samples). The estimate
of a per-unit variance has relative standard error about ``sqrt(2/K)`` for a strongly nonlinear op; per
channel, positions average and the error shrinks further (tests/test_sampling.py measures it).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import GraphnormError, RuleError
from .moments import Moments
from .rules.gaussian import safe_std

__all__ = ["SampledFallback", "SampledNode", "resolve_fallback"]

FALLBACKS = ("sample", "error")
DEFAULT_SAMPLES = 256


@dataclass(frozen=True)
class SampledNode:
    """A node whose moments come from samples, and why it has no closed form."""

    node: str
    target: str
    module_path: str | None
    reason: str

    def describe(self) -> str:
        where = f" in '{self.module_path}'" if self.module_path else ""
        return f"{self.node} ({self.target}){where}: {self.reason}"


@dataclass(frozen=True)
class SampledFallback:
    """Configuration of the sampled fallback: K samples (even, >= 2) and the seed of the common random numbers."""

    samples: int = DEFAULT_SAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 2 or self.samples % 2:
            raise GraphnormError(f"fallback samples must be an even integer >= 2, got {self.samples!r}")


def resolve_fallback(fallback: str | SampledFallback | None, samples: int = DEFAULT_SAMPLES) -> SampledFallback | None:
    """``"sample"`` (with ``samples``) or a :class:`SampledFallback` -> the configuration; ``"error"`` -> None."""
    if isinstance(fallback, SampledFallback) or fallback is None:
        return fallback
    if fallback == "sample":
        return SampledFallback(samples)
    if fallback == "error":
        return None
    raise GraphnormError(f"fallback must be 'sample' or 'error', got {fallback!r}")


class CommonRandomNumbers:
    """Standard normal draws per (node, input), antithetic and standardized per unit, created once and reused."""

    def __init__(self, config: SampledFallback):
        self.config = config
        self._draws: dict[tuple[str, int, tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}

    def draws(self, node: str, index: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """``[K, *shape]`` standard normals for input ``index`` of ``node`` (same values at every call)."""
        key = (node, index, shape, like.dtype, like.device)
        found = self._draws.get(key)
        if found is None:
            half = self.config.samples // 2
            seed = self.config.seed * 1_000_003 + zlib.crc32(f"{node}/{index}".encode())
            with disable_proxy_modes_tracing():  # constants of a recorded statistics program, not random ops
                generator = torch.Generator().manual_seed(seed)
                base = torch.randn((half, *shape), generator=generator, dtype=torch.float64)
                base = base / base.square().mean(0, keepdim=True).sqrt().clamp_min(1e-12)
                found = torch.cat([base, -base]).to(dtype=like.dtype, device=like.device)
            self._draws[key] = found
        return found


def _sample_moments(value: Any, node: str) -> Any:
    """Moments of a sampled output ``[K, B, *shape]`` (tuples and lists element-wise; non-float outputs None)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_sample_moments(item, node) for item in value)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    draws = value.flatten(0, 1)
    if draws.dim() < 2:
        raise RuleError(f"the sampled output of '{node}' has no channel dim (a scalar per sample)")
    mean = draws.mean(0)
    var = (draws - mean).square().mean(0)
    if draws.dim() == 2:
        return Moments.per_channel(mean, var, tuple(mean.shape))
    return Moments.per_unit(mean, var)


def sampled_call(call: Callable[[tuple, dict], Any], args: tuple, kwargs: dict, numbers: CommonRandomNumbers,
                 node: str, batch: int) -> Any:
    """Run ``call(args, kwargs)`` on samples of every :class:`Moments` in ``args``/``kwargs`` and return the
    output moments (a Moments, or a tuple of them for a multi-output op)."""
    leaves, spec = tree_flatten((args, kwargs))
    positions: list[int] = []
    samples: list[torch.Tensor] = []
    seen: dict[int, torch.Tensor] = {}
    for position, leaf in enumerate(leaves):
        if not isinstance(leaf, Moments):
            continue
        positions.append(position)
        if id(leaf) not in seen:  # the same activation twice shares its samples (x * x stays exact)
            z = numbers.draws(node, len(seen), (batch, *leaf.shape), leaf.loc)
            seen[id(leaf)] = leaf.unit_mean + safe_std(leaf.unit_var) * z
        samples.append(seen[id(leaf)])

    def one_draw(*values: torch.Tensor) -> Any:
        filled = list(leaves)
        for position, value in zip(positions, values, strict=True):
            filled[position] = value
        call_args, call_kwargs = tree_unflatten(filled, spec)
        return call(call_args, call_kwargs)

    try:
        output = torch.func.vmap(one_draw, randomness="different")(*samples)
    except Exception:  # an op vmap cannot batch: one call per draw
        outputs = [one_draw(*(s[k] for s in samples)) for k in range(numbers.config.samples)]
        output = _stack(outputs)
    return _sample_moments(output, node)


def _stack(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, torch.Tensor):
        return torch.stack(outputs)
    return first
