"""The third cumulant: carried through linear maps, used by activations (``accuracy="accurate"``).

An activation's moment rule assumes a Gaussian input. After a convolution that sums few skewed values (a
depthwise 3x3 conv sums nine ReLU outputs of one channel) the input is visibly skewed, and the rule's output
std is off by about 8% per channel on MobileNetV2 (``benchmarks/pre_activation_skewness.py``). Third
cumulants are as easy to propagate as variances under the same independence assumption:

- a linear map ``y = sum_i w_i x_i + b``: ``k3(y) = sum_i w_i^3 k3(x_i)`` (cumulants of independent
  summands add, and scale by ``w^3``);
- an affine per-channel map (BatchNorm) ``y = a x + b``: ``k3(y) = a^3 k3(x)``;
- a sum of independent operands (residual add): the third cumulants add;
- an activation ``f``: the moments of ``f(X)`` for ``X`` with mean ``m``, std ``s`` and skewness
  ``g = k3/s^3`` under the Gram-Charlier (type A, first Edgeworth term) density
  ``phi(z) (1 + g/6 He3(z))``, ``He3(z) = z^3 - 3 z``. Its mean and variance are the Gaussian rule's plus
  the ``g/6`` correction ``E[h(Z) He3(Z)]``; the output's third cumulant comes from the same density (so the
  next linear layer has one).

Every other op's output is treated as Gaussian (third cumulant 0), which is what the fast mode assumes
everywhere. The density is a truncated expansion: it is accurate for moderate skewness and can go negative
beyond ``|g| ~ 1``, so ``g`` is clipped to ``[-MAX_SKEW, MAX_SKEW]``. Integrals use probabilists'
Gauss-Hermite quadrature of the centred values ``f(m + s z) - f(m)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["MAX_SKEW", "activation_with_skew", "hermite_nodes", "third_through_affine"]

MAX_SKEW = 1.0
_NODES = 64
_HERMITE_CACHE: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def hermite_nodes(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilists' Gauss-Hermite nodes and weights normalized to the standard normal density."""
    key = (like.dtype, like.device)
    if key not in _HERMITE_CACHE:
        nodes, weights = np.polynomial.hermite_e.hermegauss(_NODES)
        _HERMITE_CACHE[key] = (torch.tensor(nodes, dtype=like.dtype, device=like.device),
                               torch.tensor(weights / np.sqrt(2 * np.pi), dtype=like.dtype, device=like.device))
    return _HERMITE_CACHE[key]


def activation_with_skew(function: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                         third: torch.Tensor, gaussian_mean: torch.Tensor, gaussian_var: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and third central moment of ``function(X)``, X of the given mean, variance and third
    central moment, under the Gram-Charlier density; ``gaussian_mean``/``gaussian_var`` are the exact
    Gaussian-input moments (the activation's closed-form rule), corrected here for the skewness."""
    nodes, weights = hermite_nodes(mean)
    std = var.clamp_min(0).sqrt()
    skew = torch.where(std > 0, third / std.clamp_min(1e-30) ** 3, torch.zeros_like(third)).clamp(-MAX_SKEW, MAX_SKEW)
    center = function(mean)
    values = function(mean.unsqueeze(-1) + std.unsqueeze(-1) * nodes) - center.unsqueeze(-1)
    he3 = nodes**3 - 3 * nodes
    correction = skew.unsqueeze(-1) / 6 * he3
    first = (gaussian_mean - center) + (weights * values * correction).sum(-1)
    second = gaussian_var + (gaussian_mean - center).square() + (weights * values.square() * correction).sum(-1)
    cubed = (weights * values.pow(3) * (1 + correction)).sum(-1)
    out_var = (second - first.square()).clamp_min(0)
    out_third = cubed - 3 * first * second + 2 * first.pow(3)
    return center + first, out_var, out_third


def third_through_affine(third: torch.Tensor | None, scale: torch.Tensor | float) -> torch.Tensor | None:
    """``k3(a x + b) = a^3 k3(x)``, ``scale`` broadcast against ``third`` (None: not tracked)."""
    return None if third is None else third * scale**3
