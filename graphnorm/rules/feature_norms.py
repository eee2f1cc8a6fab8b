"""Moment rules of the per-sample normalizations: LayerNorm, GroupNorm, InstanceNorm.

Each normalizes a sample by the mean and variance of its own units over a set S of D units (the last dims
for LayerNorm, a group of channels and all positions for GroupNorm, the positions of one channel for
InstanceNorm). The population limit replaces those per-sample statistics by their expectations (BatchNorm's
batch form, MATH.md section 3); it is exact as D grows, but a sample's own statistics fluctuate by
O(1/sqrt(D)) and include the unit being normalized, which changes a unit's variance by O(1/D) (up to ~25% at
D = 16). The rule keeps the 1/D terms (second-order expansion in the fluctuation of S^2, see
:func:`_normalize_over`), an approximation whose tolerance the Monte-Carlo cases state; affine weight and
bias follow exactly.
"""

from __future__ import annotations

import torch

from ..errors import RuleError
from ..moments import Moments
from . import moment_rule
from .layout import from_units


def _normalize_over(mean: torch.Tensor, var: torch.Tensor, dims: tuple[int, ...], eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of ``y_i = u_i r`` with ``u_i = x_i - xbar`` and ``r = (S^2 + eps)^(-1/2)`` over the D units of
    ``dims`` (independent Gaussian units, means ``m``, variances ``v``), to order 1/D.

    ``u`` is Gaussian: mean ``mu_i = m_i - avg m``, covariance ``C_ij = v_i delta_ij - (v_i + v_j)/D + sum v/D^2``.
    With ``tau = E[S^2] + eps`` and ``delta = (S^2 - E[S^2])/tau``, ``r = tau^(-1/2)(1 - delta/2 + 3 delta^2/8)``
    and ``r^2 = tau^(-1)(1 - delta + delta^2)``; the Gaussian identities ``Cov(u_i, u_j^2) = 2 mu_j C_ij`` and
    ``Cov(u_i^2, u_j^2) = 2 C_ij^2 + 4 mu_i mu_j C_ij`` give ``E[u_i delta]``, ``E[u_i^2 delta]`` and
    ``E[delta^2]`` in O(D). The 1/D terms are what the fluctuation of the sample's own statistics changes: at
    D = 16 units they move a unit's variance by up to ~25% against the population limit
    ``(m_i - avg m)^2/tau``, ``v_i/tau`` (tests/rules/cases.py, the LayerNorm cases)."""
    count = 1
    for d in dims:
        count *= mean.shape[d]
    total_var = var.sum(dims, keepdim=True)
    centered = mean - mean.mean(dims, keepdim=True)
    own_var = var * (1 - 2 / count) + total_var / count**2  # C_ii
    expected_square = (centered.square() + own_var).mean(dims, keepdim=True)  # E[S^2]
    tau = expected_square + eps
    weighted = (centered * var).sum(dims, keepdim=True)  # sum_j mu_j v_j
    cross = centered * var - weighted / count  # sum_j mu_j C_ij (to order 1/D)
    delta_sq = (2 * var.square() + 4 * centered.square() * var).sum(dims, keepdim=True) / (count * tau) ** 2
    u_delta = 2 * cross / (count * tau)
    second_u = centered.square() + own_var
    u2_delta = (2 * own_var.square() + 4 * centered * cross) / (count * tau)
    out_mean = (centered - u_delta / 2 + 3 / 8 * centered * delta_sq) * tau.rsqrt()
    out_second = (second_u - u2_delta + second_u * delta_sq) / tau
    return out_mean, (out_second - out_mean.square()).clamp_min(0)


def _affine(mean, var, weight, bias, shape):
    if weight is not None:
        weight = weight.reshape(shape)
        mean, var = mean * weight, var * weight * weight
    if bias is not None:
        mean = mean + bias.reshape(shape)
    return mean, var


@moment_rule("layer_norm")
def layer_norm(x: Moments, *, normalized_shape, weight=None, bias=None, eps: float = 1e-5, **_) -> Moments:
    """``F.layer_norm`` over the last ``len(normalized_shape)`` dims (see the module docstring)."""
    count = len(tuple(normalized_shape))
    if count > len(x.shape):
        raise RuleError("layer_norm normalizes over the batch dim")
    dims = tuple(range(len(x.shape) - count, len(x.shape)))
    mean, var = _normalize_over(x.unit_mean, x.unit_var, dims, eps)
    mean, var = _affine(mean, var, weight, bias, tuple(normalized_shape))
    return from_units(mean, var)


def _channel_shape(x: Moments) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (len(x.shape) - 1)


@moment_rule("group_norm")
def group_norm(x: Moments, *, num_groups: int, weight=None, bias=None, eps: float = 1e-5, **_) -> Moments:
    """``F.group_norm``: statistics over each group of ``C/num_groups`` channels and all positions."""
    channels = x.shape[0]
    grouped = (num_groups, channels // num_groups, *x.shape[1:])
    dims = tuple(range(1, len(grouped)))
    mean, var = _normalize_over(x.unit_mean.reshape(grouped), x.unit_var.reshape(grouped), dims, eps)
    mean, var = _affine(mean.reshape(x.shape), var.reshape(x.shape), weight, bias, _channel_shape(x))
    return from_units(mean, var)


@moment_rule("instance_norm")
def instance_norm(x: Moments, *, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats: bool = True, eps: float = 1e-5, **_) -> Moments:
    """``F.instance_norm``: each channel over its positions (GroupNorm with one channel per group), or with
    running statistics when ``use_input_stats`` is False (then an exact per-channel affine map)."""
    if use_input_stats or running_mean is None:
        return group_norm(x, num_groups=x.shape[0], weight=weight, bias=bias, eps=eps)
    scale = torch.rsqrt(running_var + eps)
    shape = _channel_shape(x)
    mean = (x.unit_mean - running_mean.reshape(shape)) * scale.reshape(shape)
    var = x.unit_var * (scale * scale).reshape(shape)
    mean, var = _affine(mean, var, weight, bias, shape)
    return from_units(mean, var)
