"""Moment rules of reductions over dims of a sample: ``mean`` and ``sum`` (any dims, with or without keepdim).

A mean of n independent units has the mean of their means and variance ``sum v_i / n^2``; a sum has the sum
of the means and of the variances (AP2's independence of units). A spatial mean of a channel stationary over
its n positions (per-channel mode) therefore keeps the channel mean and divides its variance by n;
per-unit mode is exact at every position. Squeeze-excitation's ``x.mean((2, 3), keepdim=True)`` is the
common case.
"""

from __future__ import annotations

import math

from ..errors import RuleError
from ..moments import Moments
from . import moment_rule
from .layout import _sample_dim, from_units


def _reduce(x: Moments, dims, keepdim: bool, average: bool, out_shape) -> Moments:
    rank = len(x.shape)
    if dims is None or dims == ():
        raise RuleError("a reduction over every dim includes the batch dim; give the dims to reduce")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    axes = sorted({_sample_dim(d, rank) for d in dims})
    count = math.prod(x.shape[a] for a in axes)
    scale = 1.0 / count if average else 1.0
    if 0 not in axes and not x.is_per_unit:
        return Moments.per_channel(x.loc * (count * scale), x.spread * (count * scale * scale), tuple(out_shape))
    mean = x.unit_mean.sum(axes, keepdim=keepdim) * scale
    var = x.unit_var.sum(axes, keepdim=keepdim) * (scale * scale)
    return from_units(mean, var)


@moment_rule("mean")
def mean(x: Moments, *, dim=None, keepdim: bool = False, out_shape, **_) -> Moments:
    """Mean over ``dim``: mean of the means, variance ``sum v_i / n^2`` (independent units)."""
    return _reduce(x, dim, keepdim, True, out_shape)


@moment_rule("sum")
def sum_(x: Moments, *, dim=None, keepdim: bool = False, out_shape, **_) -> Moments:
    """Sum over ``dim``: sums of the means and of the variances (independent units)."""
    return _reduce(x, dim, keepdim, False, out_shape)
