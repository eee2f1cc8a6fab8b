"""Correlation between the channels of one position (``accuracy="accurate"``): what convolutions sum.

A 1x1 convolution sums the channels of one position. AP2 takes them as independent, but channels that come from
one earlier 1x1 expansion (an inverted residual block expands 24 channels to 144: the 144 span a 24-dimensional
space before the activation) are correlated, and the projection back sums them: MobileNetV2's and
EfficientNet-B0's projections measured 3-5% low per block, compounding with depth. With the same-position
covariance ``S`` of its input, a 1x1 convolution's output covariance is exact: ``W S W^T`` (its variance the
diagonal).

The accurate mode carries the same-position **channel correlation** ``R`` (``[C, C]``, unit diagonal;
covariance ``S = R * s s^T`` with ``s`` the per-channel std) through these ops, and drops it (channels
independent, AP2) after any other op:

- **1x1 convolution / pointwise linear map**: ``S' = W S W^T`` (exact). Its neighbour template (module
  :mod:`.neighbours`) then weighs each input channel's template by ``W[o,c] (S W^T)[c,o]`` instead of
  ``W[o,c]^2 v_c``.
- **dense k x k convolution** (``groups=1``): with the cross-position covariance of two channels approximated
  by ``S_cd (rho_c + rho_d)(delta)/2``, ``S' = (A + A^T)/2``, ``A = sum_l G_l S W_l^T``, ``G`` the kernel
  correlated with its input channel's template (:func:`conv_correlation`); exact for 1x1. Dropped above
  :data:`CORRELATION_BUDGET` multiply-adds.
- **average and max pooling**: the average pool's rule (a depthwise convolution with a uniform kernel; for the
  max an approximation).
- **depthwise convolution** ``y_c = sum_k W[c,k] x_c(p + d k)``: ``S'_cd = S_cd sum_e X_cd(e) r_cd(d e)``
  with the cross-kernel correlation ``X_cd(e) = sum_k W[c,k] W[d,k+e]`` and the cross-position
  correlation of two channels approximated by the mean of their neighbour templates,
  ``r_cd(delta) = (rho_c(delta) + rho_d(delta))/2`` (exact on the diagonal).
- **per-channel affine maps** (BatchNorm): ``R`` unchanged up to the signs of the scales.
- **an elementwise activation**: Mehler's expansion per pair of channels,
  ``cov(f_c(X_c), f_d(X_d)) = sum_n a_n^c a_n^d R_cd^n / n!`` with ``a_n^c = E[f(m_c + s_c Z) He_n(Z)]``.
- **a sum of independent operands**: covariances add. **Concatenation**: block diagonal.
- **a product with a gate constant over positions** (squeeze-excitation, gate independent of x):
  ``cov = (S^x + m m^T) * (S^g + g g^T) - (m m^T) * (g g^T)`` elementwise.
- **global average pooling**: ``S' = S * (q_c + q_d)/2 / N``, ``q`` the neighbour-template pooling factor
  (:func:`.neighbours.pooled_variance_ratio`).

Cost: ``O(C^2)`` memory per activation, ``O(K C_out C_in (C_in + C_out))`` per convolution, a depthwise
convolution ``O(C^2 K^2)``.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..moments import Moments
from .arguments import as_tuple
from .neighbours import HERMITE_TERMS, gathered_template, kernel_cross_correlation, pooled_variance_ratio

__all__ = ["CORRELATION_BUDGET", "activation_correlation", "affine_correlation", "concatenated_correlation",
           "conv_correlation", "correlation_affordable", "covariance_of", "depthwise_correlation", "gated_correlation",
           "pooled_correlation", "sum_correlation", "template_correlated_kernel"]


def covariance_of(x: Moments) -> torch.Tensor:
    """The same-position channel covariance ``[C, C]`` of ``x`` (diagonal when no correlation is carried)."""
    std = x.unit_average_var.clamp_min(0).sqrt()
    if x.channel_correlation is None:
        return torch.diag(std.square())
    return x.channel_correlation * std.unsqueeze(0) * std.unsqueeze(1)


def correlation_of(covariance: torch.Tensor) -> torch.Tensor:
    """``S / (s s^T)`` with unit diagonal (zero rows for constant channels)."""
    std = covariance.diagonal().clamp_min(0).sqrt()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    correlation = (covariance / safe.unsqueeze(0) / safe.unsqueeze(1)).clamp(-1, 1)
    correlation = correlation * (std > 0).unsqueeze(0) * (std > 0).unsqueeze(1)
    eye = torch.eye(len(std), dtype=std.dtype, device=std.device)
    return correlation * (1 - eye) + eye


CORRELATION_BUDGET = 4 * 10**9
"""Multiply-adds above which a convolution drops the channel correlation (:func:`correlation_affordable`)."""


def correlation_affordable(weight: torch.Tensor) -> bool:
    """Whether :func:`conv_correlation` of ``weight`` ``[O, C, *K]`` costs at most :data:`CORRELATION_BUDGET`
    multiply-adds (``K O C (C + O)`` for the covariance, ``O C K (2K-1)^d`` for the cross weights). VGG's and
    ResNet-50's largest convolutions are within it."""
    out_channels, in_channels = weight.shape[:2]
    taps = math.prod(weight.shape[2:])
    offsets = math.prod(2 * k - 1 for k in weight.shape[2:])
    return taps * out_channels * in_channels * (in_channels + out_channels + offsets) <= CORRELATION_BUDGET


def conv_correlation(x: Moments, weight: torch.Tensor, dilation=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Output covariance ``[O, O]`` and cross weights ``B[o, c, e]`` (``[O, C, 2K-1, ...]``, for the output's
    neighbour template: :func:`.neighbours.linear_map_template`) of a convolution with ``groups=1`` (``weight``
    ``[O, C, *K]``; a 1x1 convolution or pointwise linear map is ``K = 1``).

    With the cross-position covariance of two channels approximated by ``S_cd (rho_c + rho_d)/2``:
    ``cov(y_o, y_p) = (A + A^T)_op / 2``, ``A = sum_l G_l S W_l^T`` with ``G[o, c, l] = sum_k W[o,c,k]
    rho_c(d (l-k))`` (:func:`template_correlated_kernel`), and ``B[o, c, e] = sum_k W[o,c,k] P[o,c,k+e]``,
    ``P[o, c, l] = (S W_l^T)[c, o]``. For ``K = 1``: ``W S W^T`` (exact) and ``B = W[o,c] (S W^T)[c,o]``."""
    out_channels, in_channels = weight.shape[:2]
    flat = weight.reshape(out_channels, in_channels, -1)  # [O, C, K]
    covariance = covariance_of(x).to(flat.dtype)
    projected = torch.einsum("cd,odk->ock", covariance, flat)  # P
    correlated = flat if x.neighbours is None else template_correlated_kernel(flat, x.neighbours, weight.shape[2:],
                                                                             dilation)
    product = torch.einsum("ock,pck->op", correlated, projected)
    return 0.5 * (product + product.T), kernel_cross_correlation(weight, projected.reshape(weight.shape))


def template_correlated_kernel(flat: torch.Tensor, template: torch.Tensor, kernel: tuple[int, ...], dilation
                               ) -> torch.Tensor:
    """``G[o, c, l] = sum_k W[o,c,k] rho_c(d (l-k))``: a kernel ``[O, C, K]`` (taps flattened from ``kernel``)
    correlated with its input channel's neighbour template ``[C, 2R+1, ...]`` (0 beyond the template)."""
    dims = len(kernel)
    at_offsets = gathered_template(template, 0, (1,) * dims, as_tuple(dilation, dims), tuple(kernel))[:, 0]
    taps = list(itertools.product(*(range(k) for k in kernel)))
    offsets = list(itertools.product(*(range(-(k - 1), k) for k in kernel)))
    position = {offset: i for i, offset in enumerate(offsets)}
    pair_index = torch.tensor([[position[tuple(b - a for a, b in zip(first, second, strict=True))]
                                for second in taps] for first in taps], device=flat.device)
    return torch.einsum("ock,ckl->ocl", flat, at_offsets[:, pair_index].to(flat.dtype))


def depthwise_correlation(x: Moments, weight: torch.Tensor, dilation) -> torch.Tensor | None:
    """The output channel correlation of a depthwise convolution (``[C, 1, *k]`` weight), or None.

    ``sum_e X_cd(e) (rho_c + rho_d)(d e)/2 = (G W^T + W G^T)_cd / 2`` with ``G[c, l] = sum_k W[c,k] rho_c(d (l-k))``
    (the kernel correlated with its channel's template), so no ``[C, C]`` product per offset is formed."""
    if x.channel_correlation is None:
        return None
    flat = weight.reshape(weight.shape[0], -1)  # [C, K]
    correlated = flat if x.neighbours is None else template_correlated_kernel(
        flat.unsqueeze(0), x.neighbours, tuple(weight.shape[2:]), dilation)[0]
    factor = 0.5 * (correlated @ flat.T + flat @ correlated.T)
    return correlation_of(covariance_of(x) * factor)


def affine_correlation(x: Moments, scale: torch.Tensor) -> torch.Tensor | None:
    """The channel correlation after a per-channel scale ``[C]`` (flips with the signs)."""
    if x.channel_correlation is None:
        return None
    sign = torch.sign(scale).reshape(-1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign).expand(x.channels)
    return x.channel_correlation * sign.unsqueeze(0) * sign.unsqueeze(1)


def activation_correlation(coefficients: torch.Tensor, x: Moments) -> torch.Tensor | None:
    """The channel correlation of ``f(X)`` from that of X, from f's Hermite coefficients at X's moments
    (:func:`.neighbours.hermite_coefficients` ``[C, N]``; Mehler's expansion, module docstring)."""
    if x.channel_correlation is None:
        return None
    correlation = x.channel_correlation.to(coefficients.dtype)
    covariance = torch.zeros_like(correlation)
    power = torch.ones_like(correlation)
    for n in range(HERMITE_TERMS):
        power = power * correlation
        covariance = covariance + coefficients[:, n].unsqueeze(1) * coefficients[:, n].unsqueeze(0) * power
    return correlation_of(covariance).to(x.channel_correlation.dtype)


def sum_correlation(a: Moments, b: Moments, scale_b: float) -> torch.Tensor | None:
    """The channel correlation of ``a + scale_b b`` for independent operands of one shape, or None."""
    if a.channel_correlation is None and b.channel_correlation is None:
        return None
    return correlation_of(covariance_of(a) + scale_b**2 * covariance_of(b))


def gated_correlation(x: Moments, gate: Moments) -> torch.Tensor | None:
    """The channel correlation of ``x g`` for a gate constant over positions, independent of x."""
    if x.channel_correlation is None and gate.channel_correlation is None:
        return None
    mean, gate_mean = x.mean, gate.mean
    outer, gate_outer = mean.unsqueeze(1) * mean.unsqueeze(0), gate_mean.unsqueeze(1) * gate_mean.unsqueeze(0)
    covariance = (covariance_of(x) + outer) * (covariance_of(gate) + gate_outer) - outer * gate_outer
    return correlation_of(covariance)


def pooled_correlation(x: Moments) -> torch.Tensor | None:
    """The channel correlation of a global average pool of ``x`` (``[C, *S]`` to ``[C, 1, ...]``), or None."""
    if x.channel_correlation is None:
        return None
    if x.neighbours is None:
        return x.channel_correlation
    factor = pooled_variance_ratio(x.neighbours, tuple(x.shape[1:]))
    scale = 0.5 * (factor.unsqueeze(0) + factor.unsqueeze(1)) / math.prod(x.shape[1:])
    return correlation_of(covariance_of(x) * scale)


def concatenated_correlation(parts: tuple[Moments, ...]) -> torch.Tensor | None:
    """Block-diagonal channel correlation of a concatenation along channels, or None."""
    if all(part.channel_correlation is None for part in parts):
        return None
    blocks = [part.channel_correlation if part.channel_correlation is not None
              else torch.eye(part.channels, dtype=part.loc.dtype, device=part.loc.device) for part in parts]
    return torch.block_diag(*blocks)
