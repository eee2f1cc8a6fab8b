"""Moment rules of affine maps: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, BatchNorm (eval and batch form).

Assumption (AP2, Shekhovtsov & Flach 2018): the inputs summed by one output unit are independent, so the
variance of the sum is the sum of the variances: ``mean = W m + b``, ``var = (W * W) v``.

Per-channel mode (inputs ``[C]``): a conv output channel sums every tap of every input channel of its group,
so only the kernel summed over space matters; zero padding at the borders is ignored (exact for interior
positions). One pass is a GEMV with ``W`` and one with ``W * W``: O(number of weights).
Per-unit mode (maps ``[C, *S]``): the real convolution of the mean map with ``W`` and of the variance map with
``W * W``, so borders are exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..moments import Moments
from . import moment_rule
from .arguments import as_tuple
from .channel_correlation import (
    affine_correlation,
    conv_correlation,
    correlation_affordable,
    correlation_of,
    depthwise_correlation,
)
from .correlated import correlated_conv_variance, correlated_linear_variance
from .fusion import FusedForm, fused, plain
from .kernels import kernel_moments
from .neighbours import correlated_output
from .skewness import third_through_affine

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _channel_vector(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel parameters ``[C]`` broadcast against ``like`` (``[C]`` or ``[C, *S]``)."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


@moment_rule("linear")
def linear(x: Moments, *, weight: torch.Tensor, bias: torch.Tensor | None = None, **_) -> Moments:
    """``y = W x + b`` over the last dim: mean ``W m + b``, var ``(W*W) v`` (independent inputs; AP2).

    Feature vectors ``[F]`` are exact per unit; on ``[C, ..., F]`` inputs the rule works on unit maps."""
    if len(x.shape) == 1:
        mean, var = kernel_moments(weight, x.loc, x.spread)
        if x.correlation is not None:
            var = correlated_linear_variance(x.spread.sqrt(), x.correlation, weight)
        third = None if x.third is None else F.linear(x.third, weight.to(x.third.dtype).pow(3))
        return Moments(mean if bias is None else mean + bias, var, (weight.shape[0],), third=third)
    mean = F.linear(x.unit_mean, weight, bias)
    var = F.linear(x.unit_var, weight * weight)
    third = None if x.third is None else F.linear(x.unit_third, weight.to(x.third.dtype).pow(3))
    return Moments(mean, var, tuple(mean.shape), third=third)


def _padding_for_unit_maps(x: torch.Tensor, padding, padding_mode: str, dims: int):
    """Pad maps explicitly for non-zero padding modes; return (maps-transform, conv padding)."""
    if padding_mode == "zeros" or isinstance(padding, str):
        return x, padding
    pads = as_tuple(padding, dims)
    flat = [p for size in reversed(pads) for p in (size, size)]
    return F.pad(x, flat, mode=padding_mode), 0


@moment_rule("conv")
def conv(x: Moments, *, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
         dilation=1, groups: int = 1, padding_mode: str = "zeros", out_shape: tuple[int, ...], **_) -> Moments:
    """Convolution (any dims, groups, depthwise): ``mean_o = sum_{c in group(o), k} W[o,c,k] m_c + b_o``,
    ``var_o = sum W[o,c,k]^2 v_c`` per channel; real convolutions of the maps per unit.

    Assumes independent inputs (AP2). Per-channel mode ignores border effects of padding; per-unit mode is
    exact for zero padding and treats reflected/replicated border copies as independent (an approximation).
    An input with a correlation template (the model input, :mod:`.correlated`) gets the variance of the sum
    of correlated inputs instead. In accurate mode (the input carries a third cumulant) the correlation of
    neighbouring positions within a channel (:mod:`.neighbours`) and between channels
    (:mod:`.channel_correlation`) is carried and summed too.
    """
    out = _conv_of_independent_positions(x, weight=weight, bias=bias, stride=stride, padding=padding,
                                         dilation=dilation, groups=groups, padding_mode=padding_mode,
                                         out_shape=out_shape)
    if x.third is None or len(x.shape) < 2:
        return out
    # accurate mode: the correlation between neighbouring positions (graphnorm.rules.neighbours)
    if x.neighbours is None and x.correlation is not None:  # the model input: its template's diagonal
        x = x.with_neighbours(torch.diagonal(x.correlation, dim1=0, dim2=1).movedim(-1, 0))
    variance_known = x.correlation is not None and padding_mode == "zeros"
    if groups == 1 and correlation_affordable(weight):
        # the channels a convolution sums are correlated (graphnorm.rules.channel_correlation)
        covariance, cross_weights = conv_correlation(x, weight, dilation)
        out = correlated_output(x, out, weight, stride=stride, dilation=dilation, groups=groups,
                                variance_known=variance_known, cross_weights=cross_weights)
        return replace(out, channel_correlation=correlation_of(covariance))
    out = correlated_output(x, out, weight, stride=stride, dilation=dilation, groups=groups,
                            variance_known=variance_known)
    if groups == x.channels == weight.shape[0] and weight.shape[1] == 1:  # depthwise
        return replace(out, channel_correlation=depthwise_correlation(x, weight, dilation))
    return out


def _conv_of_independent_positions(x: Moments, *, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                                   dilation, groups: int, padding_mode: str, out_shape: tuple[int, ...]) -> Moments:
    """The AP2 convolution rule (with the model input's full correlation template when it has one)."""
    dims = weight.dim() - 2
    if x.correlation is not None and padding_mode == "zeros":
        independent = _conv_of_independent_positions(
            Moments(x.loc, x.spread, x.shape, third=x.third), weight=weight, bias=bias, stride=stride,
            padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, out_shape=out_shape)
        var = correlated_conv_variance(x.spread.sqrt(), x.correlation, weight, stride=stride, padding=padding,
                                       dilation=dilation, groups=groups, per_unit=x.is_per_unit)
        return Moments(independent.loc, var, independent.shape, third=independent.third)
    if x.is_per_unit:
        square = weight * weight
        conv_fn = _CONV[dims]
        mean_in, conv_padding = _padding_for_unit_maps(x.loc.unsqueeze(0), padding, padding_mode, dims)
        var_in, _ = _padding_for_unit_maps(x.spread.unsqueeze(0), padding, padding_mode, dims)
        mean = conv_fn(mean_in, weight, bias, stride, conv_padding, dilation, groups)[0]
        var = conv_fn(var_in, square, None, stride, conv_padding, dilation, groups)[0]
        third = None
        if x.third is not None:  # k3 of a sum of independent values: sum of w^3 k3
            third_in, _ = _padding_for_unit_maps(x.third.unsqueeze(0), padding, padding_mode, dims)
            third = conv_fn(third_in, weight.to(third_in.dtype).pow(3), None, stride, conv_padding, dilation, groups)[0]
        return Moments(mean, var, tuple(mean.shape), third=third)
    mean, var = kernel_moments(weight, x.loc, x.spread, groups)
    if bias is not None:
        mean = mean + bias
    third = None
    if x.third is not None:
        cubed = weight.to(x.third.dtype).pow(3).flatten(2).sum(-1).reshape(groups, weight.shape[0] // groups, -1)
        third = torch.einsum("gjc,gc->gj", cubed, x.third.reshape(groups, -1)).reshape(-1)
    return Moments(mean, var, tuple(out_shape), third=third)


@moment_rule("conv_transpose")
def conv_transpose(x: Moments, *, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                   output_padding=0, dilation=1, groups: int = 1, out_shape: tuple[int, ...], **_) -> Moments:
    """Transposed convolution. Output ``o = i*stride + k*dilation - padding`` sums the taps ``k`` whose
    ``k*dilation - padding`` falls in the phase ``o mod stride``, so output positions fall into
    ``prod(stride)`` phase classes with different tap subsets.

    Per channel: each class gets the AP2 sum over its taps, and the channel moments are the equal-weight
    mixture of the classes (exact in the interior, independent inputs). Per unit: real transposed
    convolutions of the maps with ``W`` and ``W*W``.
    """
    dims = weight.dim() - 2
    square = weight * weight
    if x.is_per_unit:
        conv_fn = _CONV_TRANSPOSE[dims]
        mean = conv_fn(x.loc.unsqueeze(0), weight, bias, stride, padding, output_padding, groups, dilation)[0]
        var = conv_fn(x.spread.unsqueeze(0), square, None, stride, padding, output_padding, groups, dilation)[0]
        return Moments.per_unit(mean, var)
    stride, padding, dilation = (as_tuple(v, dims) for v in (stride, padding, dilation))
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    kernel_size = weight.shape[2:]
    phase_of_tap = [
        [(k * dilation[d] - padding[d]) % stride[d] for k in range(kernel_size[d])] for d in range(dims)
    ]
    class_means, class_vars = [], []
    for phase in itertools.product(*(range(s) for s in stride)):
        mask = torch.ones((), dtype=weight.dtype, device=weight.device)
        for d in range(dims):
            axis = torch.tensor([p == phase[d] for p in phase_of_tap[d]], dtype=weight.dtype, device=weight.device)
            mask = mask.unsqueeze(-1) * axis
        summed = (weight * mask).reshape(in_channels, out_per_group, -1).sum(-1)
        summed_sq = (square * mask).reshape(in_channels, out_per_group, -1).sum(-1)
        class_means.append(_grouped_matvec(summed, x.loc, groups))
        class_vars.append(_grouped_matvec(summed_sq, x.spread, groups))
    means, variances = torch.stack(class_means), torch.stack(class_vars)
    if bias is not None:
        means = means + bias
    mean = means.mean(0)
    var = (variances + means * means).mean(0) - mean * mean
    return Moments.per_channel(mean, var.clamp_min(0), tuple(out_shape))


def _grouped_matvec(kernel: torch.Tensor, values: torch.Tensor, groups: int) -> torch.Tensor:
    """``out[g*Og + j] = sum_{c in group g} kernel[c, j] values[c]`` for a ``[C_in, O/g]`` kernel."""
    in_channels, out_per_group = kernel.shape
    per_group = kernel.reshape(groups, in_channels // groups, out_per_group)
    return torch.einsum("gcj,gc->gj", per_group, values.reshape(groups, -1)).reshape(-1)


def batch_norm_affine(mean: torch.Tensor, var: torch.Tensor, eps: float, weight: torch.Tensor | None,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm with statistics ``(mean, var)`` as a per-channel affine ``x * scale + shift``:
    ``scale = weight/sqrt(var + eps)``, ``shift = bias - mean * scale``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


@dataclass(frozen=True)
class Normalized(FusedForm):
    """The moments after normalizing by the input's own per-channel moments (BatchNorm's batch form, the
    analytic normalizer, a folded layer): mean ``beta`` (0 without it) and variance
    ``gamma^2 (a v/(v + eps) + b)``, with ``(a, b) = (E[s^2], E[t^2])`` of BatchNorm-like noise ``(s, t)`` in
    training and ``(1, 0)`` without. Inputs ``(mean, var[, gamma][, beta])``. Backward:
    ``d var/dv = gamma^2 a eps/(v + eps)^2``, ``d var/dgamma = 2 gamma (a v/(v + eps) + b)``, ``d mean/dbeta = 1``;
    the output does not depend on the input mean."""

    eps: float
    weight: bool
    bias: bool
    noise_second: float | None = None  # E[s^2]; None: no noise
    noise_shift_second: float = 0.0  # E[t^2]

    def reference(self, mean: torch.Tensor, var: torch.Tensor, *affine: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self._affine(affine)
        if self.noise_second is None:
            out = batch_norm(Moments.per_channel(mean, var, (mean.shape[0],)), running_mean=None, running_var=None,
                             weight=weight, bias=bias, training=True, eps=self.eps, fuse=False)
            return out.loc, out.spread
        return noisy_normalized_moments(var, weight, bias, self.eps, self.noise_second, self.noise_shift_second)

    def _affine(self, affine: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        values = iter(affine)
        return next(values) if self.weight else None, next(values) if self.bias else None

    def forward(self, mean: torch.Tensor, var: torch.Tensor, *affine: torch.Tensor):
        weight, bias = self._affine(affine)
        ratio = var / (var + self.eps)
        if self.noise_second is not None:
            ratio = self.noise_second * ratio + self.noise_shift_second
        out_var = ratio if weight is None else ratio * weight.square()
        out_mean = torch.zeros_like(var) if bias is None else bias.clone()
        return (out_mean, out_var), ()

    def backward(self, inputs, outputs, grads, residuals=()):
        _, var, *affine = inputs
        weight, bias = self._affine(tuple(affine))
        grad_mean, grad_var = grads
        grad_v = grad_weight = grad_bias = None
        if grad_var is not None:
            second = 1.0 if self.noise_second is None else self.noise_second
            shift = self.eps + var
            grad_v = grad_var * (second * self.eps / (shift * shift))
            if weight is not None:
                grad_v = grad_v * weight.square()
                grad_weight = grad_var * 2 * weight * (second * var / shift + self.noise_shift_second)
        if bias is not None and grad_mean is not None:
            grad_bias = grad_mean
        return (None, grad_v, *((grad_weight,) if self.weight else ()), *((grad_bias,) if self.bias else ()))


def noisy_normalized_moments(var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                             second: torch.Tensor | float, shift_second: torch.Tensor | float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel moments of ``gamma (s x_hat + t) + beta`` for ``x_hat`` normalized by its own moments and
    noise ``(s, t)`` independent of it with ``E[s^2] = second``, ``E[t^2] = shift_second``, ``E[t] = 0``:
    mean ``beta``, var ``gamma^2 (second v/(v + eps) + shift_second)`` (exact)."""
    out_var = second * (var / (var + eps)) + shift_second
    mean = torch.zeros_like(out_var)
    if weight is not None:
        out_var = out_var * weight.square()
    if bias is not None:
        mean = mean + bias
    return mean, out_var


def normalized(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, noise_second: float | None = None, noise_shift_second: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`Normalized` as one fused op (per-channel moments)."""
    form = Normalized(float(eps), weight is not None, bias is not None, noise_second, noise_shift_second)
    affine = [t.to(var) for t in (weight, bias) if t is not None]
    return fused(form, mean, var, *affine)


@moment_rule("batch_norm")
def batch_norm(x: Moments, *, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               eps: float = 1e-5, fuse: bool = True, **_) -> Moments:
    """BatchNorm ``y = g (x - mu)/sqrt(s2 + eps) + b``, channel dim 1, exact for both forms.

    Eval form: ``(mu, s2)`` are the running statistics, so mean ``g (m - mu)/sqrt(s2 + eps) + b`` and
    var ``g^2 v/(s2 + eps)``. Batch form (``training=True``, or no running statistics): the population limit
    of batch statistics, ``(mu, s2) = (m_c, v_c)`` the input's own channel moments, so mean ``b`` and var
    ``g^2 v/(v + eps)`` per channel (one fused op, :class:`Normalized`, for plain per-channel moments).
    """
    batch_form = training or running_mean is None or running_var is None
    if batch_form and fuse and not x.is_per_unit and plain(x):
        return Moments(*normalized(x.loc, x.spread, weight, bias, eps), x.shape)
    if batch_form:
        center, spread = x.mean, x.var
    else:
        center, spread = running_mean, running_var
    scale, shift = batch_norm_affine(center, spread, eps, weight, bias)
    mean = x.loc * _channel_vector(scale, x.loc) + _channel_vector(shift, x.loc)
    var = x.spread * _channel_vector(scale * scale, x.spread)
    third = third_through_affine(x.third, _channel_vector(scale, x.loc))
    return Moments(mean, var, x.shape, third=third, neighbours=x.neighbours,  # correlations: affine-invariant
                   channel_correlation=affine_correlation(x, scale))
