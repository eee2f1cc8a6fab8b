"""Neighbour correlation within a channel (``accuracy="accurate"``): what pooling and stacked convolutions sum.

The AP2 rules take the values a unit sums as independent. Neighbouring positions of one channel are not: two
outputs of a 3x3 convolution share six of their nine inputs, a 3x3/2 max-pool's windows overlap, and a 1x1
convolution passes on a weighted average of its inputs' neighbour correlations with weights ``W^2 >= 0``, so
the correlation does not average out over channels. An average pool of positively correlated neighbours has a
larger variance than ``v/k``: DenseNet-121's transition pools were 17% low at 64x64 before this module.

The accurate mode carries, per channel, a stationary **neighbour-correlation template**
``rho_c(delta) = corr(x_{c,p}, x_{c,p+delta})`` for offsets ``|delta_i| <= RADIUS`` (``[C, 2R+1, ...]``,
centre 1), and assumes different channels independent (their correlations have random signs at init and
average out in a sum over channels) unless their same-position correlation is carried
(:mod:`.channel_correlation`; a convolution then weighs input templates by its cross weights). Rules:

- **convolution** ``y_o(p) = sum_{c,k} W[o,c,k] x_c(s p + d k)``, with the kernel autocorrelation
  ``A_oc(e) = sum_k W[o,c,k] W[o,c,k+e]``:
  ``cov(y_o(p), y_o(p + D)) = sum_c v_c sum_e A_oc(e) rho_c(s D + d e)``. ``D = 0`` is the variance
  (exact for a linear map given the template; AP2 keeps only ``e = 0``), the other ``D`` the output's
  template. Offsets beyond the input template's radius count as uncorrelated (a truncation).
  Average pooling is the same with a uniform depthwise kernel.
- **per-channel affine maps** (BatchNorm, constant scale and shift): the template is unchanged.
- **an elementwise activation** ``f`` of a Gaussian pair with correlation ``rho`` (Mehler's expansion):
  ``cov(f(X_1), f(X_2)) = sum_{n>=1} a_n^2 rho^n / n!`` with ``a_n = E[f(m + s Z) He_n(Z)]`` (probabilists'
  Hermite polynomials, Gauss-Hermite quadrature), truncated at ``HERMITE_TERMS`` and normalized so that
  ``rho = 1`` gives correlation 1.
- **a sum of independent operands** (residual add): covariances add.
- **max-pooling**: the window values are still taken as independent for the max's moments; its output
  template is the average pool's (overlapping windows), an approximation.
- **a product with a spatially constant operand** (a squeeze-excitation gate ``g``): for independent
  operands ``cov(x_p g, x_q g) = (rho v_x + m_x^2) E[g^2] - m_x^2 m_g^2``.
- **global average pooling**: ``var = v/N sum_delta rho(delta) (H - |delta_h|)(W - |delta_w|)/(H W)``.

Per-unit moments use the per-channel template for the ratio of the correlated to the independent variance
(exact in the interior, where the map is stationary; borders take the interior's ratio).
Every other op drops the template (its output is taken as independent across positions, as in fast mode).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..moments import Moments
from .arguments import as_tuple
from .skewness import hermite_nodes

__all__ = ["HERMITE_TERMS", "RADIUS", "activation_template", "add_templates", "correlated_output",
           "gathered_template", "hermite_coefficients", "independent_template", "kernel_autocorrelation",
           "kernel_cross_correlation",
           "linear_map_template", "pooled_variance_ratio", "product_template", "template_of", "template_radius"]

RADIUS = 2
HERMITE_TERMS = 12
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def independent_template(channels: int, dims: int, like: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    """The template of independent positions: 1 at offset 0, 0 elsewhere."""
    template = like.new_zeros((channels, *(2 * radius + 1,) * dims))
    template[(slice(None), *(radius,) * dims)] = 1
    return template


def template_of(x: Moments, radius: int = RADIUS) -> torch.Tensor:
    """``x``'s neighbour template, or the independent one (of ``radius``) when it carries none."""
    if x.neighbours is not None:
        return x.neighbours
    return independent_template(x.channels, len(x.shape) - 1, x.loc, radius)


def template_radius(template: torch.Tensor) -> int:
    """The radius R of a template ``[C, 2R+1, ...]``."""
    return (template.shape[1] - 1) // 2


def kernel_autocorrelation(weight: torch.Tensor) -> torch.Tensor:
    """``A[o, c, e] = sum_k W[o,c,k] W[o,c,k+e]`` for tap offsets ``e`` in ``[-(K-1), K-1]`` per dim
    (shape ``[O, C/g, 2K-1, ...]``; a dilation does not change it, only which input offset ``d e`` it meets)."""
    return kernel_cross_correlation(weight, weight)


def kernel_cross_correlation(weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``B[o, c, e] = sum_k W[o,c,k] V[o,c,k+e]`` of two kernels of one shape ``[O, C/g, *K]``, for tap offsets
    ``e`` in ``[-(K-1), K-1]`` per dim (shape ``[O, C/g, 2K-1, ...]``)."""
    out_channels, per_group = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    dims = len(kernel)
    flat_other = other.reshape(1, out_channels * per_group, *kernel)
    padding = [size - 1 for size in kernel]
    padded = F.pad(flat_other, [p for size in reversed(padding) for p in (size, size)])
    cross = _CONV[dims](padded, weight.reshape(out_channels * per_group, 1, *kernel), groups=out_channels * per_group)
    return cross.reshape(out_channels, per_group, *cross.shape[2:])


def gathered_template(template: torch.Tensor, out_radius: int, stride: tuple[int, ...], dilation: tuple[int, ...],
                       tap_span: tuple[int, ...]) -> torch.Tensor:
    """``G[c, D, e] = rho_c(s D + d e)`` (0 beyond the template's radius) for output offsets ``D`` in
    ``[-out_radius, out_radius]`` and tap offsets ``e`` in ``[-(K-1), K-1]``, flattened to ``[C, D, E]``."""
    radius = template_radius(template)
    dims = template.dim() - 1
    out_offsets = list(itertools.product(range(-out_radius, out_radius + 1), repeat=dims))
    tap_offsets = list(itertools.product(*(range(-(k - 1), k) for k in tap_span)))
    index = torch.tensor([[[s * big + d * small for big, small, s, d in zip(D, e, stride, dilation, strict=True)]
                           for e in tap_offsets] for D in out_offsets], dtype=torch.long)  # [D, E, dims]
    inside = (index.abs() <= radius).all(-1)  # [D, E]
    flat_index = torch.zeros(index.shape[:2], dtype=torch.long)
    size = 2 * radius + 1
    for dim in range(dims):
        flat_index = flat_index * size + (index[..., dim].clamp(-radius, radius) + radius)
    values = template.reshape(template.shape[0], -1)[:, flat_index.reshape(-1)].reshape(template.shape[0],
                                                                                      *flat_index.shape)
    return values * inside.to(values)


def linear_map_template(template: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, *, stride=1, dilation=1,
                        groups: int = 1, out_radius: int = RADIUS, cross_weights: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Variance ``[O]``, the independent (AP2) variance ``[O]`` and the neighbour template ``[O, 2R+1, ...]``
    of a convolution's output per channel, from its input's per-channel variance ``var`` ``[C]`` and template
    (see the module docstring). ``cross_weights`` ``[O, C, 2K-1, ...]`` (a convolution of correlated channels,
    :func:`.channel_correlation.conv_correlation`) replaces ``v_c A_oc(e)`` as the weight of input channel
    c's template at tap offset e; the covariance is then symmetrized over ``D`` and ``-D``."""
    dims = weight.dim() - 2
    stride, dilation = (as_tuple(value, dims) for value in (stride, dilation))
    gathered = gathered_template(template, out_radius, stride, dilation, tuple(weight.shape[2:]))  # [C, D, E]
    out_channels, per_group = weight.shape[:2]
    if cross_weights is not None:
        covariance = torch.einsum("oce,cde->od", cross_weights.reshape(out_channels, per_group, -1).to(gathered),
                                  gathered)
        covariance = 0.5 * (covariance + covariance.flip(-1))  # offsets D and -D: the approximation's two halves
    else:
        auto = kernel_autocorrelation(weight)  # [O, C/g, 2K-1, ...]
        weighted = gathered * var.reshape(-1, 1, 1)
        covariance = torch.einsum("gjce,gcde->gjd", auto.reshape(groups, out_channels // groups, per_group, -1),
                                  weighted.reshape(groups, per_group, *weighted.shape[1:]))
    covariance = covariance.reshape(out_channels, *(2 * out_radius + 1,) * dims)
    centre = (slice(None), *(out_radius,) * dims)
    out_var = covariance[centre].clamp_min(0)
    out_template = covariance / torch.where(out_var > 0, out_var, torch.ones_like(out_var)).reshape(
        -1, *(1,) * dims)
    out_template = out_template.clamp(-1, 1)
    out_template[centre] = 1
    energy = weight.square().reshape(out_channels, per_group, -1).sum(-1)  # A_oc(0) = sum_k W[o,c,k]^2
    independent = torch.einsum("gjc,gc->gj", energy.reshape(groups, out_channels // groups, per_group),
                               var.reshape(groups, per_group)).reshape(-1)
    return out_var, independent, out_template


def correlated_output(x: Moments, out: Moments, weight: torch.Tensor, *, stride=1, dilation=1, groups: int = 1,
                      variance_known: bool = False, cross_weights: torch.Tensor | None = None) -> Moments:
    """``out`` (a linear map's output under AP2, per channel or per unit) with its variance scaled by the
    correlated/independent ratio of its channel and the output template attached. ``variance_known``: the
    variance already accounts for correlation (the model input's full template), only attach the template."""
    correlated, independent, out_template = linear_map_template(template_of(x), x.unit_average_var, weight,
                                                                stride=stride,
                                                                dilation=dilation, groups=groups,
                                                                cross_weights=cross_weights)
    if variance_known:
        return out.with_neighbours(out_template)
    ratio = correlated / torch.where(independent > 0, independent, torch.ones_like(independent))
    ratio = torch.where(independent > 0, ratio, torch.ones_like(ratio))
    spread = out.spread * ratio.reshape(-1, *(1,) * (out.spread.dim() - 1))
    return Moments(out.loc, spread, out.shape, third=out.third, neighbours=out_template)


def _hermite_polynomials(like: torch.Tensor) -> torch.Tensor:
    """``He_n(node)/sqrt(n!)`` ``[HERMITE_TERMS, Q]`` at the Gauss-Hermite nodes, n = 1..HERMITE_TERMS (the
    recurrence ``He_{n+1} = x He_n - n He_{n-1}`` in float64), in the dtype of ``like``."""
    exact, _ = hermite_nodes(like.new_empty(0, dtype=torch.float64))
    polys = [torch.ones_like(exact), exact]
    for n in range(1, HERMITE_TERMS):
        polys.append(exact * polys[n] - n * polys[n - 1])
    scaled = torch.stack([polys[n] / math.sqrt(math.factorial(n)) for n in range(1, HERMITE_TERMS + 1)])
    return scaled.to(like.dtype)


def hermite_coefficients(function: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor, var: torch.Tensor
                         ) -> torch.Tensor:
    """``a_n / sqrt(n!)`` ``[C, HERMITE_TERMS]``, n = 1.., with ``a_n = E[f(m + s Z) He_n(Z)]`` per channel, by
    the Gauss-Hermite nodes of :mod:`.skewness` (float32 or better: Hermite polynomials of degree 12
    overflow float16)."""
    mean, var = _at_least_float32(mean), _at_least_float32(var)
    nodes, weights = hermite_nodes(mean)
    values = function(mean.unsqueeze(-1) + var.clamp_min(0).sqrt().unsqueeze(-1) * nodes)  # [C, Q]
    return torch.einsum("cq,q,nq->cn", values, weights, _hermite_polynomials(mean))


def activation_template(coefficients: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """The template of ``f(X)`` for X Gaussian per channel with neighbour template ``template``, from f's
    :func:`hermite_coefficients` at X's moments: Mehler's expansion (module docstring)."""
    dtype = template.dtype
    template = _at_least_float32(template)
    energy = coefficients.square()  # [C, N]
    total = energy.sum(-1)
    powers = torch.stack([template**n for n in range(1, HERMITE_TERMS + 1)], dim=-1)  # [C, ..., N]
    shaped = energy.reshape(energy.shape[0], *(1,) * (template.dim() - 1), -1)
    covariance = (powers * shaped).sum(-1)
    denominator = torch.where(total > 0, total, torch.ones_like(total)).reshape(-1, *(1,) * (template.dim() - 1))
    out = (covariance / denominator).clamp(-1, 1)
    radius = template_radius(template)
    out[(slice(None), *(radius,) * (template.dim() - 1))] = 1
    return out.to(dtype)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision values in float32: Hermite polynomials of degree 12 overflow float16."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def add_templates(var_a: torch.Tensor, template_a: torch.Tensor, var_b: torch.Tensor, template_b: torch.Tensor
                  ) -> torch.Tensor:
    """The template of ``a + b`` for independent operands: ``(v_a rho_a + v_b rho_b)/(v_a + v_b)``."""
    dims = template_a.dim() - 1
    va, vb = (v.reshape(-1, *(1,) * dims) for v in (var_a, var_b))
    total = va + vb
    return (va * template_a + vb * template_b) / torch.where(total > 0, total, torch.ones_like(total))


def pooled_variance_ratio(template: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Variance of the mean over an ``spatial`` map relative to independent positions:
    ``sum_delta rho(delta) prod_i (n_i - |delta_i|)/n_i`` (``[C]``, offsets beyond the template uncorrelated)."""
    radius = template_radius(template)
    dims = template.dim() - 1
    factor = torch.ones((), dtype=template.dtype, device=template.device)
    for size in spatial:
        offsets = torch.arange(-radius, radius + 1, dtype=template.dtype, device=template.device)
        factor = factor.unsqueeze(-1) * ((size - offsets.abs()).clamp_min(0) / size)
    return (template * factor).reshape(template.shape[0], -1).sum(-1).clamp_min(0) if dims else template


def product_template(mean: torch.Tensor, var: torch.Tensor, template: torch.Tensor, gate_mean: torch.Tensor,
                     gate_var: torch.Tensor) -> torch.Tensor:
    """The template of ``x g`` for ``g`` constant over positions and independent of ``x`` (all ``[C]``)."""
    dims = template.dim() - 1
    shape = (-1, *(1,) * dims)
    m, v, gm, gv = (t.reshape(shape) for t in (mean, var, gate_mean, gate_var))
    gate_second = gv + gm.square()
    covariance = (template * v + m.square()) * gate_second - m.square() * gm.square()
    centre = covariance[(slice(None), *(template_radius(template),) * dims)].reshape(shape)
    return (covariance / torch.where(centre > 0, centre, torch.ones_like(centre))).clamp(-1, 1)
