"""Moment rules of pooling: max, average and adaptive average (1-D and 2-D).

Max-pooling (per channel) uses exact order statistics: the max of n iid ``N(m, v)`` has mean ``m + s E_n`` and
variance ``v V_n`` (:func:`~graphnorm.rules.gaussian.max_order_statistics`), with n the window size; windows
are taken as independent and identically distributed, and border windows cut by padding are ignored.
Per unit, windows are folded with Clark's pairwise max (Clark 1961; Gast & Roth 2018), which underestimates
the std of a max of 9 iid by about 4%.

Max-pooling after a non-decreasing activation ``f`` (ReLU, ReLU6, LeakyReLU, sigmoid, ...) uses the exact
identity ``maxpool(f(X)) = f(maxpool(X))``: per channel, ``E[f(max X)^k]`` is integrated over the exact
density of the max of the Gaussian pre-activations; per unit, the Clark-pooled pre-activation goes through
``f``'s rule.
Treating the rectified variable as Gaussian instead (the published method) makes the std after resnet's stem
wrong by 35-48% (MATH.md section 6).

Average pooling over k independent values keeps the mean and divides the variance by k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import RuleError
from ..moments import Moments
from . import moment_rule
from .gaussian import clark_max, max_order_statistics, max_quadrature


def _as_tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _as_2d(maps: torch.Tensor) -> torch.Tensor:
    """``[C, L]`` or ``[C, H, W]`` maps as a ``[1, C, H, W]`` batch."""
    return (maps.unsqueeze(1) if maps.dim() == 2 else maps).unsqueeze(0)


def _window_geometry(dims: int, kernel_size, stride, padding, dilation=1):
    kernel, step = _as_tuple(kernel_size, dims), _as_tuple(stride or kernel_size, dims)
    pad, dil = _as_tuple(padding, dims), _as_tuple(dilation, dims)
    if dims == 1:
        return (1, *kernel), (1, *step), (0, *pad), (1, *dil)
    return kernel, step, pad, dil


@moment_rule("max_pool")
def max_pool(x: Moments, *, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
             out_shape: tuple[int, ...], **_) -> Moments:
    """Max over each window; see the module docstring for the math and its assumptions."""
    dims = len(x.shape) - 1
    if dims not in (1, 2):
        raise RuleError(f"max_pool rule supports 1-D and 2-D pooling, got a {dims}-D activation")
    window = math.prod(_as_tuple(kernel_size, dims))
    if x.monotone_of is not None:
        function, rule, pre_activation = x.monotone_of
        if not pre_activation.is_per_unit:
            return _monotone_of_channel_max(function, pre_activation, window, tuple(out_shape))
        pooled = max_pool(pre_activation, kernel_size=kernel_size, stride=stride, padding=padding,
                          dilation=dilation, ceil_mode=ceil_mode, out_shape=out_shape)
        return rule(pooled)
    if not x.is_per_unit:
        offset, shrink = max_order_statistics(window)
        return Moments.per_channel(x.loc + x.spread.sqrt() * offset, x.spread * shrink, tuple(out_shape))
    kernel, step, pad, dil = _window_geometry(dims, kernel_size, stride, padding, dilation)
    means, variances, valid = _unfold_windows(x, kernel, step, pad, dil, out_shape)
    mean, var, seen = means[:, 0], variances[:, 0], valid[:, 0]
    for k in range(1, means.shape[1]):
        both_mean, both_var = clark_max(mean, var, means[:, k], variances[:, k])
        take_new = valid[:, k] & ~seen
        mean = torch.where(seen & valid[:, k], both_mean, torch.where(take_new, means[:, k], mean))
        var = torch.where(seen & valid[:, k], both_var, torch.where(take_new, variances[:, k], var))
        seen = seen | valid[:, k]
    return Moments.per_unit(mean.reshape(out_shape), var.reshape(out_shape))


def _monotone_of_channel_max(function, pre_activation: Moments, window: int, out_shape) -> Moments:
    """``maxpool(f(X)) = f(max X)`` with the max of ``window`` iid ``N(m, s^2)`` equal to ``m + s M``, M the max
    of iid standard normals: ``E[f(m + s M)^k]`` by quadrature over M's exact density (no Gaussian
    approximation of the max). Moments of ``f - f(m + s E_n)`` keep the variance free of cancellation."""
    points, weights = max_quadrature(window, pre_activation.loc, stride=8)
    mean, std = pre_activation.loc.unsqueeze(-1), pre_activation.spread.sqrt().unsqueeze(-1)
    typical = function(mean + std * max_order_statistics(window)[0])
    centered = function(mean + std * points) - typical
    first = (weights * centered).sum(-1)
    second = (weights * centered * centered).sum(-1)
    return Moments.per_channel(typical[..., 0] + first, (second - first * first).clamp_min(0), out_shape)


def _unfold_windows(x: Moments, kernel, step, pad, dil, out_shape):
    """Windows of the unit maps as ``[C, K, L]`` plus a validity mask (padding and ceil-mode overhang)."""
    mean, var = _as_2d(x.loc), _as_2d(x.spread)
    height, width = mean.shape[-2:]
    out_spatial = tuple(out_shape[1:]) if len(out_shape) == 3 else (1, out_shape[1])
    extra = [max(0, (o - 1) * s + (k - 1) * d + 1 - (size + 2 * p))
             for o, s, k, d, size, p in zip(out_spatial, step, kernel, dil, (height, width), pad, strict=True)]
    padding = (pad[1], pad[1] + extra[1], pad[0], pad[0] + extra[0])
    ones = torch.ones_like(mean[:, :1])

    def windows(t: torch.Tensor) -> torch.Tensor:
        unfolded = F.unfold(F.pad(t, padding), kernel, dilation=dil, stride=step)
        return unfolded.reshape(t.shape[1], math.prod(kernel), -1)

    valid = windows(F.pad(ones, (0, 0, 0, 0))) > 0.5
    means, variances = windows(mean), windows(var)
    if means.shape[-1] != math.prod(out_spatial):
        raise RuleError(f"max_pool windows give {means.shape[-1]} outputs, expected {out_spatial}")
    return means, variances, valid.expand_as(means)


@moment_rule("avg_pool")
def avg_pool(x: Moments, *, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
             count_include_pad: bool = True, divisor_override=None, out_shape: tuple[int, ...], **_) -> Moments:
    """Average over each window of k values with divisor D (k, or the override): mean ``m k/D``, var
    ``v k/D^2`` (independent values). Per unit: ``var = S(v)/D^2`` with the window sums S computed by the
    same pooling, so zero padding, ``count_include_pad`` and ``ceil_mode`` are exact."""
    dims = len(x.shape) - 1
    if dims not in (1, 2):
        raise RuleError(f"avg_pool rule supports 1-D and 2-D pooling, got a {dims}-D activation")
    if not x.is_per_unit:
        window = math.prod(_as_tuple(kernel_size, dims))
        divisor = divisor_override or window
        return Moments.per_channel(x.loc * (window / divisor), x.spread * (window / divisor**2), tuple(out_shape))
    kernel, step, pad, _dil = _window_geometry(dims, kernel_size, stride, padding)

    def pool(t: torch.Tensor, divisor=divisor_override) -> torch.Tensor:
        return F.avg_pool2d(t, kernel, step, pad, ceil_mode, count_include_pad, divisor)

    mean, var = _as_2d(x.loc), _as_2d(x.spread)
    ones = torch.ones_like(mean[:, :1])
    window_sum_of_ones, average_of_ones = pool(ones, 1), pool(ones)
    # divisor D = S(1)/A(1); var = S(v)/D^2 = S(v) A(1)^2 / S(1)^2
    out_var = pool(var, 1) * (average_of_ones / window_sum_of_ones) ** 2
    return Moments.per_unit(pool(mean).reshape(out_shape), out_var.reshape(out_shape))


def _adaptive_bin_counts(in_size: int, out_size: int) -> torch.Tensor:
    starts = [(i * in_size) // out_size for i in range(out_size)]
    ends = [-((-(i + 1) * in_size) // out_size) for i in range(out_size)]
    return torch.tensor([e - s for s, e in zip(starts, ends, strict=True)], dtype=torch.float64)


@moment_rule("adaptive_avg_pool")
def adaptive_avg_pool(x: Moments, *, out_shape: tuple[int, ...], **_) -> Moments:
    """Adaptive average pooling: output bin j averages ``n_j`` inputs (PyTorch's bin edges
    ``floor(j I/O)``, ``ceil((j+1) I/O)``), so its variance is ``v / n_j`` (independent values). Per channel
    the bins are mixed: mean ``m``, var ``v mean_j(1/n_j)``."""
    counts = torch.ones((), dtype=torch.float64)
    for in_size, out_size in zip(x.shape[1:], out_shape[1:], strict=True):
        counts = counts.unsqueeze(-1) * _adaptive_bin_counts(in_size, out_size)
    inverse = (1.0 / counts).to(x.loc.dtype)
    if not x.is_per_unit:
        return Moments.per_channel(x.loc, x.spread * inverse.mean(), tuple(out_shape))
    pool = F.adaptive_avg_pool1d if len(out_shape) == 2 else F.adaptive_avg_pool2d
    spatial = tuple(out_shape[1:])
    mean = pool(x.loc.unsqueeze(0), spatial)[0]
    var = pool(x.spread.unsqueeze(0), spatial)[0] * inverse
    return Moments.per_unit(mean, var)
