"""Moment rules of pooling: max, average and adaptive average (1-D and 2-D).

Max-pooling takes the values of a window as independent and identically distributed: the max of n iid
``N(m, v)`` is ``m + s M`` with M the max of n iid standard normals, whose mean ``E_n`` and variance ``V_n``
come from 1-D quadrature of its exact density (:func:`~graphnorm.rules.gaussian.max_order_statistics`).
Per channel, n is the kernel size and border windows cut by padding are ignored. Per unit, the values of a
window are independent but not identically distributed (near a border, and everywhere on small maps, zero
padding upstream gives each position its own mean): the max's distribution function is the product of the
values' (:func:`max_of_independent`), integrated by quadrature; it equals the iid result where the window's
values agree. This replaces Clark's pairwise fold (Clark 1961; MATH.md), which underestimates the std of a
max of 9 iid by ~4% at every stem max-pool, and the moment-matched mixture of the window's values, which
counted the spread of their means as variance (13x the measured variance at VGG11-BN's last pool at 32x32).

Max-pooling after a non-decreasing activation ``f`` (ReLU, ReLU6, LeakyReLU, sigmoid, ...) uses the exact
identity ``maxpool(f(X)) = f(maxpool(X))``: ``E[f(m + s M)^k]`` is integrated over the exact density of M, so
the rectified variable is never treated as Gaussian (the published method's error of 35-48% on the std after
resnet's stem, MATH.md section 6).

Average pooling over k independent values keeps the mean and divides the variance by k.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from ..errors import RuleError
from ..moments import Moments, MonotoneSource
from . import moment_rule
from .arguments import as_tuple
from .channel_correlation import depthwise_correlation, pooled_correlation
from .fusion import FusedForm, fused, fusion_enabled
from .gaussian import legendre_nodes, max_order_statistics, max_quadrature, max_third_cumulant, safe_std
from .neighbours import correlated_output, linear_map_template, pooled_variance_ratio
from .piecewise import (
    Base,
    centered_gradients,
    centered_piecewise,
    centered_piecewise_derivatives,
    evaluate_piecewise,
    max_base,
)


def _as_2d(maps: torch.Tensor) -> torch.Tensor:
    """``[C, L]`` or ``[C, H, W]`` maps as a ``[1, C, H, W]`` batch."""
    return (maps.unsqueeze(1) if maps.dim() == 2 else maps).unsqueeze(0)


def _window_geometry(dims: int, kernel_size, stride, padding, dilation=1):
    kernel, step = as_tuple(kernel_size, dims), as_tuple(stride or kernel_size, dims)
    pad, dil = as_tuple(padding, dims), as_tuple(dilation, dims)
    if dims == 1:
        return (1, *kernel), (1, *step), (0, *pad), (1, *dil)
    return kernel, step, pad, dil


@moment_rule("max_pool")
def max_pool(x: Moments, *, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
             out_shape: tuple[int, ...], **_) -> Moments:
    """Max over each window; see the module docstring for the math and its assumptions. In accurate mode the
    output's neighbour template and channel correlation are the average pool's (overlapping windows share
    values; an approximation)."""
    out = _max_pool(x, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                    out_shape=out_shape)
    if x.neighbours is None:
        return out
    window = _uniform_window(x, kernel_size, len(x.shape) - 1)
    *_, template = linear_map_template(x.neighbours, x.unit_average_var, window, stride=stride or kernel_size,
                                       dilation=dilation, groups=x.channels)
    return replace(out.with_neighbours(template), channel_correlation=depthwise_correlation(x, window, dilation))


def _uniform_window(x: Moments, kernel_size, dims: int) -> torch.Tensor:
    """The averaging kernel of a pooling window as a depthwise conv weight ``[C, 1, *k]``."""
    kernel = as_tuple(kernel_size, dims)
    return x.loc.new_full((x.channels, 1, *kernel), 1.0 / math.prod(kernel))


def _max_pool(x: Moments, *, kernel_size, stride, padding, dilation, out_shape: tuple[int, ...]) -> Moments:
    dims = len(x.shape) - 1
    if dims not in (1, 2):
        raise RuleError(f"max_pool rule supports 1-D and 2-D pooling, got a {dims}-D activation")
    source = x.monotone_of
    skewed = x.third is not None  # accurate mode
    if source is not None:
        x = source.pre_activation
    if not x.is_per_unit:
        window = math.prod(as_tuple(kernel_size, dims))
        return _max_of_iid(x.loc, x.spread, window, source, tuple(out_shape), skewed=skewed)
    kernel, step, pad, dil = _window_geometry(dims, kernel_size, stride, padding, dilation)
    means, variances, valid = _unfold_windows(x, kernel, step, pad, dil, out_shape)
    function = None if source is None else source.function
    breakpoints = () if source is None or source.piecewise is None else tuple(source.piecewise[0])
    mean, var, third = max_of_independent(means, variances.clamp_min(0), valid, function, breakpoints,
                                          skewed=skewed)
    return Moments(mean.reshape(out_shape), var.reshape(out_shape), tuple(out_shape),
                   third=None if third is None else third.reshape(out_shape))


def max_of_independent(means: torch.Tensor, variances: torch.Tensor, valid: torch.Tensor,
                       function: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       breakpoints: tuple[float, ...] = (), skewed: bool = False, nodes: int = 32,
                       chunk_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Moments of ``f(T)``, ``T = max_k X_k`` over each window of independent ``X_k ~ N(m_k, v_k)`` with their
    own means and variances (``means``/``variances``/``valid``: ``[C, K, L]``, K the window, L the outputs;
    invalid entries, padding, take no part), f non-decreasing or the identity. Returns mean, variance and, if
    ``skewed``, the third central moment, each ``[C, L]``.

    T has the distribution function ``F(t) = prod_k Phi((t - m_k)/s_k)`` and density
    ``F(t) sum_k phi(z_k) / (s_k Phi(z_k))``, ``z_k = (t - m_k)/s_k`` (in logarithms: no underflow), and
    ``E[(f(T) - c)^j]`` is integrated by Gauss-Legendre quadrature (``nodes`` per piece) on the interval
    outside which ``F < e^-30`` or ``1 - F < e^-30`` (:func:`_max_support`), split at the ``breakpoints`` of a
    piecewise f, where the integrand has a kink. ``c = f(E[T])`` keeps the variance from
    cancelling. For equal means and variances this is the max of iid values (:func:`_max_of_iid`); where the
    means of a window differ (units near a border, small maps, whose means the zero padding shifts) it is the
    exact answer, which the moment-matched mixture of the window is not: the mixture puts the spread of the
    means into the variance of every value (MATH.md section 2, "Max-pooling")."""
    channels, window, outputs = means.shape
    flat = [t.permute(0, 2, 1).reshape(-1, window) for t in (means, variances, valid.to(means.dtype))]
    per_unit = 2 + len(breakpoints)
    chunk = max(1, chunk_elements // (window * nodes * (per_unit - 1)))
    results = [torch.cat(parts) for parts in zip(*(
        _max_moments(*(t[start:start + chunk] for t in flat), function, breakpoints, skewed, nodes)
        for start in range(0, max(1, flat[0].shape[0]), chunk)), strict=True)]
    mean, var = results[0], results[1]
    third = results[2] if skewed else None
    shape = (channels, outputs)
    return mean.reshape(shape), var.reshape(shape), None if third is None else third.reshape(shape)


def _max_support(mean: torch.Tensor, std: torch.Tensor, present: torch.Tensor, iterations: int = 24
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of windows ``[U, K]``, an interval ``[low, high]`` that holds T = max_k X_k but for a mass of
    at most ``2 e^-30``: bisection (``iterations`` steps, keeping the outer end) for ``log F(low) = -30`` and
    for ``log sum_k P(X_k > high) = -30`` (an upper bound of ``1 - F``), both monotone in the point, from the
    bracket ``[max_k (m_k - 12 s_k), max_k (m_k + 12 s_k)]``. The quadrature's nodes then sit where T's mass
    is, however far the window's means are apart. Not differentiated (the mass outside is below 1e-12)."""
    lowest = torch.finfo(mean.dtype).min
    start = torch.where(present, mean - 12 * std, lowest).amax(1)
    end = torch.where(present, mean + 12 * std, lowest).amax(1)
    def log_cdf(t: torch.Tensor) -> torch.Tensor:
        return torch.where(present, torch.special.log_ndtr((t.unsqueeze(1) - mean) / std), 0.0).sum(1)

    def log_survival(t: torch.Tensor) -> torch.Tensor:
        tails = torch.special.log_ndtr((mean - t.unsqueeze(1)) / std)
        return torch.where(present, tails, lowest).logsumexp(1)

    def bisect(function: Callable[[torch.Tensor], torch.Tensor], rising: bool) -> tuple[torch.Tensor, ...]:
        a, b = start.clone(), end.clone()
        for _ in range(iterations):
            middle = 0.5 * (a + b)
            above = function(middle) > -30.0
            if rising:  # log F rises: above the level, the point is too high
                b = torch.where(above, middle, b)
                a = torch.where(above, a, middle)
            else:  # the survival falls: above the level, the point is too low
                a = torch.where(above, middle, a)
                b = torch.where(above, b, middle)
        return a, b

    with torch.no_grad():
        low, _ = bisect(log_cdf, rising=True)
        _, high = bisect(log_survival, rising=False)
    return low, torch.maximum(high, low + std.amin(1) * 1e-3)


def _max_moments(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, function, breakpoints: tuple,
                 skewed: bool, nodes: int) -> tuple[torch.Tensor, ...]:
    """:func:`max_of_independent` on windows as rows ``[U, K]`` (``weight`` 1 for valid entries, else 0)."""
    std = safe_std(var)
    low, high = _max_support(mean.detach(), std.detach(), weight > 0)
    inner = [torch.clamp(low.new_full(low.shape, b), low, high) for b in breakpoints]
    edges = torch.stack([low, *inner, high], 1)  # [U, P + 1]
    x, w = legendre_nodes(nodes, mean)
    half = 0.5 * (edges[:, 1:] - edges[:, :-1])  # [U, P]
    points = (edges[:, :-1] + half).unsqueeze(-1) + half.unsqueeze(-1) * x  # [U, P, N]
    weights = (half.unsqueeze(-1) * w).reshape(points.shape[0], -1)
    points = points.reshape(points.shape[0], -1)  # [U, P N]
    z = (points.unsqueeze(1) - mean.unsqueeze(-1)) / std.unsqueeze(-1)  # [U, K, P N]
    log_cdf = torch.special.log_ndtr(z)
    keep = (weight > 0).unsqueeze(-1)  # (where, not a product: a padding entry's log may be -inf)
    log_total = torch.where(keep, log_cdf, 0.0).sum(1)  # log F(t)
    hazard = torch.exp(-0.5 * z * z - 0.5 * math.log(2 * math.pi) - log_cdf) / std.unsqueeze(-1)
    density = torch.exp(log_total) * torch.where(keep, hazard, 0.0).sum(1)
    mass = weights * density
    mass = mass / mass.sum(1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    values = points if function is None else function(points)
    expected_t = (mass * points).sum(1, keepdim=True)
    typical = expected_t if function is None else function(expected_t)
    centered = values - typical
    first = (mass * centered).sum(1)
    second = (mass * centered * centered).sum(1)
    out_mean = typical.squeeze(1) + first
    out_var = (second - first * first).clamp_min(0)
    if not skewed:
        return out_mean, out_var
    third = (mass * centered**3).sum(1) - 3 * first * second + 2 * first**3
    return out_mean, out_var, third


def _max_of_iid(mean: torch.Tensor, var: torch.Tensor, window: int, source: MonotoneSource | None,
                out_shape, per_unit: bool = False, skewed: bool = False) -> Moments:
    """Moments of ``f(max of window iid N(mean, var))``, f the monotone activation of ``source`` or the identity.

    The max is ``mean + std M``, M the max of iid standard normals: ``(mean + std E_n, var V_n)`` exactly.
    A piecewise-polynomial f is integrated exactly against M's density (tabulated partial moments); a smooth
    f by quadrature over that density (per channel) or, per unit, through its rule applied to the
    moment-matched Gaussian of the max (the cheap approximation). Moments are taken of
    ``f - f(mean + std E_n)``, so the variance does not cancel. ``skewed`` (accurate mode) also returns the
    third central moment the same way (the max is right-skewed: skewness 0.38 for a 3x3 window), so the
    next activation is corrected for it."""
    offset, shrink = max_order_statistics(window)
    if source is None:
        third = var.clamp_min(0) ** 1.5 * max_third_cumulant(window) if skewed else None
        return Moments(mean + var.sqrt() * offset, var * shrink, out_shape, third=third)
    if source.piecewise is not None and not skewed and fusion_enabled():
        breakpoints, pieces = source.piecewise
        form = MaxOfMonotone(window, tuple(breakpoints), tuple(tuple(piece) for piece in pieces))
        return Moments(*fused(form, mean, var), out_shape)
    std = safe_std(var)
    typical = source.function(mean + std * offset)
    if source.piecewise is not None:
        breakpoints, pieces = source.piecewise
        raw = centered_piecewise(mean, std, breakpoints, pieces, typical, max_base(window),
                                 orders=3 if skewed else 2)
    elif not per_unit or skewed:
        raw = _smooth_max_moments(source.function, mean, std, typical, window, orders=3 if skewed else 2,
                                  stride=8 if not per_unit else 64)
    else:
        return source.rule(Moments(mean + var.sqrt() * offset, var * shrink, out_shape))
    first, second = raw[0], raw[1]
    third = raw[2] - 3 * first * second + 2 * first**3 if skewed else None
    return Moments(typical + first, (second - first * first).clamp_min(0), out_shape, third=third)


@dataclass(frozen=True)
class MaxOfMonotone(FusedForm):
    """``f(max of window iid N(mean, var))`` for a non-decreasing piecewise-polynomial f (the branch of
    :func:`_max_of_iid` for ReLU and clamps) as one fused op (:mod:`.fusion`): moments about
    ``f(mean + std E_n)`` against the max's tabulated partial moments; backward by the derivatives of
    :mod:`.piecewise` with the tables' slopes at the limits."""

    window: int
    breakpoints: tuple[float, ...]
    pieces: tuple[tuple[float, ...], ...]
    # constants of the window, computed once (a compiled program then holds them as constants)
    offset: float = field(init=False, compare=False, repr=False)
    base: Base = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", max_order_statistics(self.window)[0])
        object.__setattr__(self, "base", max_base(self.window))

    def _parts(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        std = safe_std(var)
        return std, evaluate_piecewise(mean + std * self.offset, self.breakpoints, self.pieces)

    def reference(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        std, typical = self._parts(mean, var)
        first, second = centered_piecewise(mean, std, self.breakpoints, self.pieces, typical, self.base)
        return typical + first, (second - first * first).clamp_min(0)

    def backward(self, inputs, outputs, grads, residuals=()):
        mean, var = inputs
        std, typical = self._parts(mean, var)
        first, second, *derivatives = centered_piecewise_derivatives(mean, std, self.breakpoints, self.pieces,
                                                                     typical, self.base)
        return centered_gradients(first, derivatives, second - first * first, var, std, grads)


def _smooth_max_moments(function, mean: torch.Tensor, std: torch.Tensor, typical: torch.Tensor, window: int,
                        orders: int, stride: int, chunk: int = 8192) -> tuple[torch.Tensor, ...]:
    """``E[(f(mean + std M) - typical)^k]``, k = 1..orders, by quadrature over the density of M (the max of
    ``window`` iid standard normals), in chunks of units so that memory stays ``chunk x points``."""
    points, weights = max_quadrature(window, mean, stride=stride)
    flat_mean, flat_std, flat_typical = mean.reshape(-1), std.reshape(-1), typical.reshape(-1)
    sums = [[] for _ in range(orders)]
    for start in range(0, max(1, flat_mean.numel()), chunk):
        part = slice(start, start + chunk)
        centered = (function(flat_mean[part].unsqueeze(-1) + flat_std[part].unsqueeze(-1) * points)
                    - flat_typical[part].unsqueeze(-1))
        for k in range(orders):
            sums[k].append((weights * centered ** (k + 1)).sum(-1))
    return tuple(torch.cat(parts).reshape(mean.shape) for parts in sums)


def _unfold_windows(x: Moments, kernel, step, pad, dil, out_shape):
    """Windows of the unit maps as ``[C, K, L]`` plus a validity mask (padding and ceil-mode overhang)."""
    mean, var = _as_2d(x.loc), _as_2d(x.spread)
    height, width = mean.shape[-2:]
    out_spatial = tuple(out_shape[1:]) if len(out_shape) == 3 else (1, out_shape[1])
    extra = [max(0, (o - 1) * s + (k - 1) * d + 1 - (size + 2 * p))
             for o, s, k, d, size, p in zip(out_spatial, step, kernel, dil, (height, width), pad, strict=True)]
    padding = (pad[1], pad[1] + extra[1], pad[0], pad[0] + extra[0])

    def windows(t: torch.Tensor) -> torch.Tensor:
        unfolded = F.unfold(F.pad(t, padding), kernel, dilation=dil, stride=step)
        return unfolded.reshape(t.shape[1], math.prod(kernel), -1)

    # The mask depends on shapes only: computed outside any recording (graphnorm.program), it is a constant.
    with disable_proxy_modes_tracing():
        valid = windows(torch.ones((1, 1, height, width), dtype=mean.dtype, device=mean.device)) > 0.5
    means, variances = windows(mean), windows(var)
    if means.shape[-1] != math.prod(out_spatial):
        raise RuleError(f"max_pool windows give {means.shape[-1]} outputs, expected {out_spatial}")
    return means, variances, valid.expand_as(means)


@moment_rule("avg_pool")
def avg_pool(x: Moments, *, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
             count_include_pad: bool = True, divisor_override=None, out_shape: tuple[int, ...], **_) -> Moments:
    """Average over each window of k values with divisor D (k, or the override): mean ``m k/D``, var
    ``v k/D^2`` (independent values). Per unit: ``var = S(v)/D^2`` with the window sums S computed by the
    same pooling, so zero padding, ``count_include_pad`` and ``ceil_mode`` are exact. In accurate mode the
    variance also sums the covariances of the window's neighbours (:mod:`.neighbours`: a depthwise conv with
    a uniform kernel)."""
    dims = len(x.shape) - 1
    if dims not in (1, 2):
        raise RuleError(f"avg_pool rule supports 1-D and 2-D pooling, got a {dims}-D activation")
    out = _avg_pool(x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                    count_include_pad=count_include_pad, divisor_override=divisor_override, out_shape=out_shape)
    if x.third is None:
        return out
    window = _uniform_window(x, kernel_size, dims)
    out = correlated_output(x, out, window, stride=stride or kernel_size, groups=x.channels)
    return replace(out, channel_correlation=depthwise_correlation(x, window, 1))


def _avg_pool(x: Moments, *, kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool,
              divisor_override, out_shape: tuple[int, ...]) -> Moments:
    dims = len(x.shape) - 1
    if not x.is_per_unit:
        window = math.prod(as_tuple(kernel_size, dims))
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


def _adaptive_bin_counts(in_size: int, out_size: int) -> list[int]:
    starts = [(i * in_size) // out_size for i in range(out_size)]
    ends = [-((-(i + 1) * in_size) // out_size) for i in range(out_size)]
    return [e - s for s, e in zip(starts, ends, strict=True)]


@moment_rule("adaptive_avg_pool")
def adaptive_avg_pool(x: Moments, *, out_shape: tuple[int, ...], **_) -> Moments:
    """Adaptive average pooling: output bin j averages ``n_j`` inputs (PyTorch's bin edges
    ``floor(j I/O)``, ``ceil((j+1) I/O)``), so its variance is ``v / n_j`` (independent values). Per channel
    the bins are mixed: mean ``m``, var ``v mean_j(1/n_j)``. In accurate mode the variance is multiplied by
    the sum of the neighbour correlations over the bin (:func:`.neighbours.pooled_variance_ratio`, bins of
    the average size)."""
    counts = [math.prod(bin_sizes) for bin_sizes in itertools.product(
        *(_adaptive_bin_counts(in_size, out_size) for in_size, out_size in zip(x.shape[1:], out_shape[1:],
                                                                                 strict=True)))]
    ratio = None
    if x.neighbours is not None:  # accurate mode: neighbours within a bin are correlated
        # (an upsampling pool, output larger than input, copies one value into each bin: a bin of 1)
        bins = tuple(max(1, round(size / out)) for size, out in zip(x.shape[1:], out_shape[1:], strict=True))
        ratio = pooled_variance_ratio(x.neighbours, bins).reshape(-1, *(1,) * (len(out_shape) - 1))
    channel_correlation = pooled_correlation(x) if math.prod(out_shape[1:]) == 1 else None
    if not x.is_per_unit:  # (shape-derived constants in Python: one op in a recorded program)
        var = x.spread * (sum(1.0 / n for n in counts) / len(counts))
        return Moments(x.loc, var if ratio is None else var * ratio.reshape(-1), tuple(out_shape),
                       channel_correlation=channel_correlation)
    pool = F.adaptive_avg_pool1d if len(out_shape) == 2 else F.adaptive_avg_pool2d
    spatial = tuple(out_shape[1:])
    inverse = torch.tensor([1.0 / n for n in counts], dtype=x.loc.dtype, device=x.loc.device).reshape(spatial)
    mean = pool(x.loc.unsqueeze(0), spatial)[0]
    var = pool(x.spread.unsqueeze(0), spatial)[0] * inverse
    return Moments(mean, var if ratio is None else var * ratio, tuple(mean.shape),
                   channel_correlation=channel_correlation)
