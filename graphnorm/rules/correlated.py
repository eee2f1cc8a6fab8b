"""Variance of a linear map of correlated inputs: conv and Linear layers reading the model input.

A conv output sums ``y_op = sum_{c,i} W[o,c,i] x_{c, p s + i dil}``. Its variance is exact for *any*
input distribution once the covariance of the summed inputs is known:

    var y_op = sum_{c,d} sum_{i,j} W[o,c,i] W[o,d,j] cov(x_{c, p s + i dil}, x_{d, p s + j dil}).

With the stationary correlation template of :mod:`graphnorm.unit_stats`, ``cov(x_cp, x_dq) =
rho_cd(q - p) sigma_cp sigma_dq``, the sum groups by tap offset ``t = j - i`` (input offset ``t dil``):

    var y_op = sum_{c,d,t} rho_cd(t dil) sum_i [W[o,c,i] W[o,d,i+t]] [sigma_c(p s + i dil) sigma_d(p s + (i+t) dil)]

Per unit this is one convolution of the products ``Q_cdt(q) = rho_cd(t dil) sigma_c(q) sigma_d(q + t dil)``
(zero outside the zero-padded map) with the kernel autocorrelations ``K[o, cdt, i] = W[o,c,i] W[o,d,i+t]``;
per channel (``sigma`` constant over space, borders ignored) it is the contraction of ``rho`` with
``sum_i K``. Offsets beyond the template's radius count as uncorrelated; ``t = 0, c = d`` is the
independent (AP2) term. Cost: ``C^2 T`` times the independent rule's, with ``T`` the number of offsets: meant
for the first layers, whose input channels are few.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..unit_stats import offset_slices

__all__ = ["correlated_conv_variance", "correlated_linear_variance"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped weight ``[O, C/g, *k]`` as a dense ``[O, C, *k]`` one (zero outside each output's group)."""
    if groups == 1:
        return weight
    out_channels, per_group = weight.shape[:2]
    dense = weight.new_zeros((out_channels, per_group * groups, *tuple(weight.shape[2:])))
    outputs_per_group = out_channels // groups
    for group in range(groups):
        rows = slice(group * outputs_per_group, (group + 1) * outputs_per_group)
        dense[rows, group * per_group:(group + 1) * per_group] = weight[rows]
    return dense


def _shifted(values: torch.Tensor, shift: tuple[int, ...], leading: int) -> torch.Tensor:
    """``out[..., q] = values[..., q + shift]`` over the trailing spatial dims, zero where out of range."""
    out = torch.zeros_like(values)
    target, source = offset_slices(tuple(values.shape[leading:]), shift)
    out[(Ellipsis, *target)] = values[(Ellipsis, *source)]
    return out


def _tap_offsets(kernel: tuple[int, ...], dilation: tuple[int, ...], radius: int) -> list[tuple[int, ...]]:
    """Tap offsets ``t`` whose input offset ``t * dilation`` lies within the correlation template."""
    ranges = [[t for t in range(-(k - 1), k) if abs(t * d) <= radius] for k, d in zip(kernel, dilation, strict=True)]
    return list(itertools.product(*ranges))


def _kernel_products(weight: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """``K[o, c, d, i] = W[o,c,i] W[o,d,i+t]`` (zero where ``i + t`` leaves the kernel), ``[O, C, C, *k]``."""
    shifted = _shifted(weight, offset, 2)
    return weight.unsqueeze(2) * shifted.unsqueeze(1)


def correlated_conv_variance(std: torch.Tensor, correlation: torch.Tensor, weight: torch.Tensor, *, stride,
                             padding, dilation, groups: int, per_unit: bool) -> torch.Tensor:
    """Variance of a convolution's output under ``cov = rho sigma sigma`` (see the module docstring).

    ``std`` is ``[C, *S]`` per unit or ``[C]`` per channel; returns ``[O, *S_out]`` or ``[O]``. Zero padding.
    """
    dims = weight.dim() - 2
    def as_tuple(v):
        return (tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims)
    stride, dilation = as_tuple(stride), as_tuple(dilation)
    radius = (correlation.shape[2] - 1) // 2 if correlation.dim() > 2 else 0
    dense = _dense_weight(weight, groups)
    channels = dense.shape[1]
    offsets = _tap_offsets(tuple(dense.shape[2:]), dilation, radius)

    def rho(offset: tuple[int, ...]) -> torch.Tensor:
        return correlation[(slice(None), slice(None), *(t * d + radius for t, d in zip(offset, dilation,
                                                                                         strict=True)))]

    if not per_unit:
        variance = dense.new_zeros(dense.shape[0])
        for offset in offsets:
            summed = _kernel_products(dense, offset).flatten(3).sum(-1)  # [O, C, C]
            variance = variance + torch.einsum("ocd,cd->o", summed, rho(offset) * torch.outer(std, std))
        return variance.clamp_min(0)
    flat = _flat_padding(padding, tuple(dense.shape[2:]), dilation)
    padded = F.pad(std.unsqueeze(0), flat)[0]  # zero padding: sigma = 0 outside
    products, kernels = [], []
    for offset in offsets:
        input_shift = tuple(t * d for t, d in zip(offset, dilation, strict=True))
        pair = padded.unsqueeze(1) * _shifted(padded, input_shift, 1).unsqueeze(0)  # [C, C, *S]
        products.append(pair * rho(offset).reshape((channels, channels) + (1,) * dims))
        kernels.append(_kernel_products(dense, offset))
    stacked = torch.stack(products, 0).reshape((-1, *tuple(padded.shape[1:])))
    kernel = torch.stack(kernels, 1).reshape((dense.shape[0], -1, *tuple(dense.shape[2:])))
    return _CONV[dims](stacked.unsqueeze(0), kernel, None, stride, 0, dilation)[0].clamp_min(0)


def _flat_padding(padding, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """``F.pad``'s argument (last dim first) for a conv's ``padding`` (ints, or "valid"/"same")."""
    if padding == "valid":
        return [0] * (2 * len(kernel))
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [p for total in reversed(totals) for p in (total // 2, total - total // 2)]
    pads = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * len(kernel)
    return [p for size in reversed(pads) for p in (size, size)]


def correlated_linear_variance(std: torch.Tensor, correlation: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``var y = diag(W S R S W^T)`` for ``y = W x`` with ``cov x = S R S`` (``S = diag(std)``): exact."""
    scaled = weight * std
    return ((scaled @ correlation) * scaled).sum(-1).clamp_min(0)
