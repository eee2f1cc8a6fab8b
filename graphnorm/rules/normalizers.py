"""Moment rules of the modules graphnorm's rewrites insert (see :mod:`graphnorm.normalizers`).

These rules let moment propagation run through a converted model, which is how a converted model computes
the statistics of every normalizer from the current weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from ..moments import Moments
from ..normalizers import (
    AnalyticNorm,
    BatchNoise,
    ChannelAffine,
    FixedBatchNorm,
    NormPropLayer,
    expected_noise_scale,
    stochastic_variance_factor,
)
from ..ops import register_instance_op, register_op
from . import moment_rule
from .affine import batch_norm, conv, linear
from .kernels import kernel_moments as channel_kernel_moments

REPARAM = "reparam"


@moment_rule("analytic_norm")
def analytic_norm(x: Moments, *, module: AnalyticNorm, training: bool, **_) -> Moments:
    """The analytic normalizer normalizes by its input's own analytic moments: the batch form of BatchNorm,
    mean ``beta`` and variance ``gamma^2 v/(v + eps)`` (exact). With BN-like noise of virtual batch M in
    training, the variance becomes ``gamma^2 M/(M-3) (v/(v+eps) + 1/M)`` (noise independent of x)."""
    if not (training and module.stochastic_batch):
        return batch_norm(x, running_mean=None, running_var=None, weight=module.weight, bias=module.bias,
                          training=True, eps=module.eps)
    # Noise is shared over positions: summarize per channel, where the output moments are exact.
    normalized_var = x.var / (x.var + module.eps)
    var = stochastic_variance_factor(module.stochastic_batch) * (normalized_var + 1.0 / module.stochastic_batch)
    mean = torch.zeros_like(var)
    if module.weight is not None:
        var = var * module.weight.square()
    if module.bias is not None:
        mean = mean + module.bias
    return Moments.per_channel(mean, var, x.shape)


@moment_rule("batch_noise")
def batch_noise(x: Moments, *, module: BatchNoise, training: bool, **_) -> Moments:
    """``y = s (x - beta) + gamma t + beta`` with noise independent of x: per channel, with ``d = m - beta``,
    mean ``beta + E[s] d``, var ``E[s^2] (v + d^2) - E[s]^2 d^2 + gamma^2 E[s^2]/M`` (exact); identity in eval."""
    if not training:
        return x
    virtual_batch = module.stochastic_batch
    second, first = stochastic_variance_factor(virtual_batch), expected_noise_scale(virtual_batch)
    mean, var = x.mean, x.var
    beta = module.bias if module.bias is not None else torch.zeros_like(mean)
    gamma2 = module.weight.square() if module.weight is not None else torch.ones_like(mean)
    offset = mean - beta
    out_var = second * (var + offset * offset) - first**2 * offset * offset + gamma2 * second / virtual_batch
    return Moments.per_channel(beta + first * offset, out_var, x.shape)


@moment_rule("channel_affine")
def channel_affine(x: Moments, *, scale: torch.Tensor, shift: torch.Tensor, **_) -> Moments:
    """Constant ``x * scale + shift`` per channel: mean ``m scale + shift``, var ``v scale^2`` (exact)."""
    view = (-1,) + (1,) * (x.loc.dim() - 1)
    scale, shift = scale.to(x.loc).reshape(view), shift.to(x.loc).reshape(view)
    return Moments(x.loc * scale + shift, x.spread * scale * scale, x.shape)


def _layer_rule(x: Moments, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                out_shape: tuple[int, ...]) -> Moments:
    if isinstance(layer, nn.Linear):
        return linear(x, weight=weight, bias=bias)
    return conv(x, weight=weight, bias=bias, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                groups=layer.groups, padding_mode=layer.padding_mode, out_shape=out_shape)


@moment_rule("normprop_layer")
def normprop_layer(x: Moments, *, module: NormPropLayer, out_shape: tuple[int, ...], **_) -> Moments:
    """NormProp's layer is a Linear/Conv with weight ``gamma W/(c ||W||)`` and bias ``beta``: the affine rule
    with that weight (AP2, independent inputs)."""
    return _layer_rule(x, module.layer, module.effective_weight(), module.beta, out_shape)


@moment_rule(REPARAM)
def reparameterized_layer(x: Moments, *, layer: nn.Module, out_shape: tuple[int, ...], **_) -> Moments:
    """A Linear/Conv with a BatchNorm folded into its weight: ``W_eff = gamma W/sigma``,
    ``b_eff = beta - gamma mu/sigma`` with ``mu = W m``, ``sigma^2 = (W*W) v + eps`` from *this* input's
    channel moments. Per channel the output is exactly ``(beta, gamma^2 (sigma^2 - eps)/sigma^2)``; per unit,
    the affine rule with ``W_eff`` and ``b_eff``."""
    state = layer.parametrizations.weight[0].state
    gamma = layer.parametrizations.weight[0].gamma
    beta = layer.parametrizations.bias[0].beta
    raw = layer.parametrizations.weight.original
    mu, spread = channel_kernel_moments(raw, x.mean, x.var, state.groups)
    sigma2 = spread + state.eps
    gamma2 = 1.0 if gamma is None else gamma.square()
    if not x.is_per_unit:
        mean = torch.zeros_like(mu) if beta is None else beta + torch.zeros_like(mu)
        return Moments.per_channel(mean, gamma2 * spread / sigma2, tuple(out_shape))
    scale = torch.rsqrt(sigma2) if gamma is None else gamma * torch.rsqrt(sigma2)
    weight = raw * scale.reshape((-1,) + (1,) * (raw.dim() - 1))
    bias = -mu * scale if beta is None else beta - mu * scale
    return _layer_rule(x, layer, weight, bias, out_shape)


register_op(AnalyticNorm, "analytic_norm", lambda m, x: ((x,), {"module": m, "training": m.training}))
register_op(BatchNoise, "batch_noise", lambda m, x: ((x,), {"module": m, "training": m.training}))
register_op(ChannelAffine, "channel_affine", lambda m, x: ((x,), {"scale": m.scale, "shift": m.shift}))
register_op(NormPropLayer, "normprop_layer", lambda m, x: ((x,), {"module": m}))
register_op(FixedBatchNorm, "batch_norm", lambda m, x: ((x,), {
    "running_mean": m.running_mean, "running_var": m.running_var, "weight": m.weight, "bias": m.bias,
    "training": False, "eps": m.eps}))
register_instance_op(REPARAM, lambda m, x: ((x,), {"layer": m}))


def is_reparameterized(module: nn.Module) -> bool:
    return getattr(module, "graphnorm_op", None) == REPARAM and parametrize.is_parametrized(module, "weight")
