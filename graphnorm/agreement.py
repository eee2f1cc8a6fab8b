"""How a converted model agrees with the original: the check every conversion reports.

Both models run in eval mode on the same inputs (the user's data, or samples drawn from the input statistics
with a fixed seed). Reported: the top-1 agreement (the fraction of argmax decisions over dim 1 that match, per
sample, or per position for dense outputs), the relative output error per sample
``||y_converted - y_original|| / ||y_original||`` over all output tensors (median and worst), the largest
absolute difference, and, with labels, the accuracy of both models.

This is distinct from the onnxruntime verification of an export, which checks that the exported file computes
what the converted model computes; this checks that the converted model computes what the original computed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from .errors import GraphnormError, first_line
from .graphs import parameter_dtype
from .stats import InputStats

__all__ = ["Agreement", "compare_outputs", "evaluating"]


@dataclass(frozen=True)
class Agreement:
    """The converted model against the original, both in eval, on ``samples`` inputs from ``source``."""

    samples: int
    source: str  # "data" or "input statistics"
    top1: float | None  # fraction of matching argmax decisions; None when the output has no class dim
    median_relative_error: float
    max_relative_error: float
    max_abs_error: float
    accuracy_original: float | None = None
    accuracy_converted: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self, min_agreement: float, max_relative_error: float) -> list[str]:
        """What falls short of the thresholds, as phrases (empty when nothing does)."""
        found = []
        if self.top1 is not None and not self.top1 >= min_agreement:
            found.append(f"top-1 agreement {100 * self.top1:.1f}% < {100 * min_agreement:g}%")
        if not self.median_relative_error <= max_relative_error:
            found.append(f"median relative output error {self.median_relative_error:.2g} > {max_relative_error:g}")
        return found

    def __str__(self) -> str:
        parts = []
        if self.top1 is not None:
            parts.append(f"top-1 {100 * self.top1:.2f}%")
        parts.append(f"relative output error median {self.median_relative_error:.2g}, "
                     f"max {self.max_relative_error:.2g}")
        text = ", ".join(parts) + f" on {self.samples} samples from {self.source}"
        if self.accuracy_original is not None and self.accuracy_converted is not None:
            text += (f"; accuracy original {100 * self.accuracy_original:.2f}%, "
                     f"converted {100 * self.accuracy_converted:.2f}%")
        return text


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode and give every submodule its own training flag back afterwards."""
    flags = [(module, module.training) for root in modules for module in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


def _labelled_batches(data: Any, labels: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(data)
        y = None if labels is None else torch.as_tensor(labels)
        if y is not None and len(y) != len(x):
            raise GraphnormError(f"labels has {len(y)} entries for {len(x)} samples; give one label per sample")
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size], None if y is None else y[start:start + batch_size]
        return
    if labels is not None:
        raise GraphnormError("labels goes with data given as a tensor; a loader yields (x, y) pairs itself")
    for item in data:
        if isinstance(item, (tuple, list)):
            yield torch.as_tensor(item[0]), torch.as_tensor(item[1]) if len(item) > 1 else None
        else:
            yield torch.as_tensor(item), None


def _sampled_batches(stats: InputStats, input_shape: tuple[int, ...], samples: int, batch_size: int
                     ) -> Iterator[tuple[torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(0)
    for start in range(0, samples, batch_size):
        yield stats.sample((min(batch_size, samples - start), *input_shape[1:]), generator=generator), None


def _tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point output tensors (batch first), each as ``[N, -1]``-reshapable."""
    leaves = [leaf for leaf in tree_leaves(output)
              if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim() >= 1]
    if not leaves:
        raise GraphnormError("the model's output holds no floating-point tensor to compare")
    return leaves


def _run(model: nn.Module, x: torch.Tensor, which: str) -> list[torch.Tensor]:
    """The model's floating outputs on ``x`` (cast to the dtype of the model's parameters, e.g. a float16
    model), in float32 or wider for the comparison."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    try:
        return [t if t.dtype == torch.float64 else t.float() for t in _tensors(model(x))]
    except (RuntimeError, ValueError, TypeError) as err:
        raise GraphnormError(f"the agreement check could not run the {which} model on a batch of shape "
                             f"{tuple(x.shape)}: {first_line(err)}; skip the check with agreement_samples=0 "
                             "(--agreement-samples 0) or give data it accepts") from err


def _decisions(output: torch.Tensor) -> torch.Tensor | None:
    """Argmax over dim 1 (classes), or None when the output has no class dim of size > 1."""
    if output.dim() < 2 or output.shape[1] < 2:
        return None
    return output.argmax(dim=1)


def compare_outputs(original: nn.Module, converted: nn.Module, *, input_shape: tuple[int, ...],
                    stats: InputStats, data: Any = None, labels: Any = None, samples: int = 16,
                    batch_size: int = 64) -> Agreement:
    """Run both models in eval on ``data`` (a tensor ``[N, C, ...]`` with optional ``labels``, or an iterable
    of batches or ``(x, y)`` pairs) or, without data, on ``samples`` inputs drawn from ``stats`` (seed 0), and
    say how their outputs agree. Neither model's mode or parameters change."""
    if data is not None:
        batches, source = _labelled_batches(data, labels, batch_size), "data"
    else:
        batches, source = _sampled_batches(stats, input_shape, samples, batch_size), "input statistics"
    errors: list[torch.Tensor] = []
    max_abs, matches, decisions = 0.0, 0, 0
    correct = {"original": 0, "converted": 0}
    labelled = 0
    dtype = parameter_dtype(original)
    with evaluating(original, converted), torch.no_grad():
        for x, y in batches:
            x = x.to(dtype) if x.is_floating_point() else x
            reference, result = _run(original, x, "original"), _run(converted, x, "converted")
            squared_diff = sum((r.double() - c.double()).square().reshape(len(x), -1).sum(1) for r, c in zip(
                reference, result, strict=True))
            squared_ref = sum(r.double().square().reshape(len(x), -1).sum(1) for r in reference)
            errors.append((squared_diff / squared_ref.clamp_min(1e-300)).sqrt())
            max_abs = max(max_abs, max(float((r.double() - c.double()).abs().max()) for r, c in zip(
                reference, result, strict=True)))
            first_reference, first_result = _decisions(reference[0]), _decisions(result[0])
            if first_reference is not None and first_result is not None:
                matches += int((first_reference == first_result).sum())
                decisions += first_reference.numel()
                if y is not None and first_reference.shape == y.shape:
                    correct["original"] += int((first_reference == y).sum())
                    correct["converted"] += int((first_result == y).sum())
                    labelled += y.numel()
    if not errors:
        raise GraphnormError("no samples to compare the converted model with the original on")
    relative = torch.cat(errors)
    finite = torch.isfinite(relative).all()
    return Agreement(
        samples=int(relative.numel()), source=source, top1=matches / decisions if decisions else None,
        median_relative_error=float(relative.median()) if finite else math.inf,
        max_relative_error=float(relative.max()) if finite else math.inf,
        max_abs_error=max_abs,
        accuracy_original=correct["original"] / labelled if labelled else None,
        accuracy_converted=correct["converted"] / labelled if labelled else None)
