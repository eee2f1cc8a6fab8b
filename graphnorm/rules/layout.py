"""Moment rules of ops that move, copy, select or resample values without combining them across units.

Every rule here is exact per unit: an output unit is a copy of one input unit (indexing, split, permute,
expand, stack, nearest interpolation, reflect/replicate padding, ``F.unfold``), a constant (constant
padding), or a fixed linear combination of independent input units, whose mean is that combination of the
means and whose variance the combination of the variances with squared weights (bilinear and bicubic
interpolation, ``F.fold``). Per channel, the channel moments of the result are the mixture over its positions.

Copies are perfectly correlated with their originals; a later rule that sums them (a convolution over an
expanded or padded map) assumes them independent, as it does for any two positions (MATH.md section 6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import RuleError
from ..moments import Moments
from . import moment_rule


def from_units(mean: torch.Tensor, var: torch.Tensor) -> Moments:
    """Moments from unit maps of any rank >= 1 (rank 1: a feature vector, per channel by definition)."""
    if mean.dim() == 0:
        raise RuleError("the result has no channel dim (one scalar per sample)")
    if mean.dim() == 1:
        return Moments.per_channel(mean, var, tuple(mean.shape))
    return Moments.per_unit(mean, var)


def _sample_dim(dim: int, rank: int) -> int:
    """A dim of the batched tensor (rank ``rank + 1``) as a dim of one sample; the batch dim is refused."""
    dim = dim % (rank + 1)
    if dim == 0:
        raise RuleError("the op acts on the batch dim; graphnorm models one sample at a time")
    return dim - 1


@moment_rule("getitem")
def getitem(x, *, index, out_shape, **_) -> Moments:
    """``x[index]``. On a multi-output op's tuple: the selected output's moments. On an activation: basic
    indexing (ints, slices, Ellipsis) that keeps the batch dim whole selects unit moments."""
    if isinstance(x, (tuple, list)):
        item = x[index]
        if not isinstance(item, Moments):
            raise RuleError("the selected output is not a floating-point activation")
        return item
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (int, slice)) and i is not Ellipsis for i in index):
        raise RuleError("advanced indexing (tensors, None) has no closed-form rule")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = len(x.shape) + 1 - (len(index) - 1)
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    if not index or index[0] != slice(None):
        raise RuleError("indexing selects along the batch dim")
    rest = index[1:]
    if not x.is_per_unit and all(i == slice(None) for i in rest[1:]) and rest and isinstance(rest[0], slice):
        return Moments.per_channel(x.loc[rest[0]], x.spread[rest[0]], tuple(out_shape))
    return from_units(x.unit_mean[rest], x.unit_var[rest])


@moment_rule("split")
def split(x: Moments, *, sections, dim: int = 0, out_shape, **_) -> tuple[Moments, ...]:
    """``split``/``chunk``/``unbind``: each part keeps its units' moments (``sections`` are sizes, or None for
    unbind). Splitting per-channel moments along channels splits the channel vectors."""
    axis = _sample_dim(dim, len(x.shape))
    if sections is None:  # unbind
        return tuple(from_units(m, v) for m, v in zip(x.unit_mean.unbind(axis), x.unit_var.unbind(axis), strict=True))
    if axis == 0 and not x.is_per_unit:
        return tuple(Moments.per_channel(m, v, tuple(s)) for m, v, s in
                     zip(x.loc.split(sections), x.spread.split(sections), out_shape, strict=True))
    means, variances = x.unit_mean.split(sections, axis), x.unit_var.split(sections, axis)
    return tuple(from_units(m, v) for m, v in zip(means, variances, strict=True))


@moment_rule("permute")
def permute(x: Moments, *, dims, **_) -> Moments:
    """``permute``/``transpose``/``movedim`` of the sample dims (``dims`` excludes the batch dim): unit moments
    move with their units. A permutation that keeps the channel dim first leaves channel moments as they are."""
    dims = tuple(dims)
    if not x.is_per_unit and dims[0] == 0:
        return Moments.per_channel(x.loc, x.spread, tuple(x.shape[d] for d in dims))
    return from_units(x.unit_mean.permute(dims), x.unit_var.permute(dims))


@moment_rule("expand")
def expand(x: Moments, *, out_shape, **_) -> Moments:
    """``expand``/``expand_as``/``broadcast_to``: copies of units. Same channels: channel moments unchanged."""
    out_shape = tuple(out_shape)
    if not x.is_per_unit and out_shape[0] == x.shape[0]:
        return Moments.per_channel(x.loc, x.spread, out_shape)
    extra = len(out_shape) - len(x.shape)
    mean = x.unit_mean.reshape((1,) * extra + x.shape)
    var = x.unit_var.reshape((1,) * extra + x.shape)
    return from_units(mean.expand(out_shape), var.expand(out_shape))


@moment_rule("pad")
def pad(x: Moments, *, pad, mode: str = "constant", value=None, **_) -> Moments:
    """``F.pad``: constant padding adds units with mean ``value`` and variance 0; reflect, replicate and
    circular padding copy border units (the maps are padded the same way)."""
    mean, var = x.unit_mean.unsqueeze(0), x.unit_var.unsqueeze(0)
    if mode == "constant":
        return from_units(F.pad(mean, pad, value=float(value or 0.0))[0], F.pad(var, pad)[0])
    if len(x.shape) == 1:
        raise RuleError(f"{mode} padding needs spatial dims")
    return from_units(F.pad(mean, pad, mode=mode)[0], F.pad(var, pad, mode=mode)[0])


def _interpolation_matrix(in_size: int, out_size: int, mode: str, align_corners, like: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` weights of 1-D resampling by ``mode`` (the separable factor of the 2-D/3-D modes): the
    interpolation of each basis vector."""
    basis = torch.eye(in_size, dtype=like.dtype, device=like.device)
    if mode in ("nearest", "nearest-exact", "area"):
        result = F.interpolate(basis.unsqueeze(1), size=out_size, mode=mode)
        return result[:, 0].T
    if mode == "bicubic":  # bicubic exists in 2-D only: a width-1 image
        result = F.interpolate(basis[:, None, :, None], size=(out_size, 1), mode="bicubic", align_corners=align_corners)
        return result[:, 0, :, 0].T
    result = F.interpolate(basis.unsqueeze(1), size=out_size, mode="linear", align_corners=align_corners)
    return result[:, 0].T


@moment_rule("interpolate")
def interpolate(x: Moments, *, mode: str = "nearest", align_corners=None, out_shape, **_) -> Moments:
    """``F.interpolate``/``nn.Upsample`` (nearest, linear/bilinear/trilinear, bicubic, area): each output unit
    is ``sum_i w_i x_i`` over input units with the mode's weights, so mean ``sum w_i m_i`` and variance
    ``sum w_i^2 v_i`` (independent units). The weights are separable: one matrix per spatial axis."""
    if len(x.shape) < 2:
        raise RuleError("interpolate needs spatial dims")
    mean, var = x.unit_mean, x.unit_var
    axis_mode = {"bilinear": "linear", "trilinear": "linear"}.get(mode, mode)
    for axis, (in_size, out_size) in enumerate(zip(x.shape[1:], out_shape[1:], strict=True), start=1):
        weights = _interpolation_matrix(in_size, out_size, axis_mode, align_corners, mean)
        mean = torch.movedim(torch.movedim(mean, axis, -1) @ weights.T, -1, axis)
        var = torch.movedim(torch.movedim(var, axis, -1) @ (weights * weights).T, -1, axis)
    return Moments.per_unit(mean, var)


@moment_rule("stack")
def stack(*parts: Moments, dim: int = 0, out_shape, **_) -> Moments:
    """``torch.stack``: the parts' unit moments side by side along the new dim."""
    if not all(isinstance(part, Moments) for part in parts):
        raise RuleError("stack of random and constant tensors has no closed-form rule")
    axis = _sample_dim(dim, len(out_shape))
    return from_units(torch.stack([p.unit_mean for p in parts], axis), torch.stack([p.unit_var for p in parts], axis))


@moment_rule("unfold")
def unfold(x: Moments, *, kernel_size, dilation=1, padding=0, stride=1, **_) -> Moments:
    """``F.unfold``/``nn.Unfold`` (im2col): every output unit is a copy of an input unit or zero padding."""
    if len(x.shape) != 3:
        raise RuleError("unfold has a rule for [C, H, W] activations")
    mean = F.unfold(x.unit_mean.unsqueeze(0), kernel_size, dilation, padding, stride)[0]
    var = F.unfold(x.unit_var.unsqueeze(0), kernel_size, dilation, padding, stride)[0]
    return from_units(mean, var)


@moment_rule("fold")
def fold(x: Moments, *, output_size, kernel_size, dilation=1, padding=0, stride=1, **_) -> Moments:
    """``F.fold``/``nn.Fold`` (col2im): overlapping blocks are summed, so means and variances are summed
    (independent blocks)."""
    mean = F.fold(x.unit_mean.unsqueeze(0), output_size, kernel_size, dilation, padding, stride)[0]
    var = F.fold(x.unit_var.unsqueeze(0), output_size, kernel_size, dilation, padding, stride)[0]
    return from_units(mean, var)
