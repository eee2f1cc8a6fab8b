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
    noise_moments,
)
from ..ops import register_instance_op, register_op
from ..program import folded_layer
from . import moment_rule
from .affine import batch_norm, conv, linear, noisy_normalized_moments, normalized
from .fusion import plain

REPARAM = "reparam"


@moment_rule("analytic_norm")
def analytic_norm(x: Moments, *, module: AnalyticNorm, training: bool, **_) -> Moments:
    """The analytic normalizer normalizes by its input's own analytic moments: the batch form of BatchNorm,
    mean ``beta`` and variance ``gamma^2 v/(v + eps)`` (exact). With noise ``(s, t)`` in training (BatchNorm's of
    virtual batch M, or learned), the variance becomes ``gamma^2 (E[s^2] v/(v+eps) + E[t^2])`` (noise independent
    of x; for BatchNorm's noise ``E[s^2] = M/(M-3)``, ``E[t^2] = E[s^2]/M``)."""
    if not (training and module.stochastic_batch):
        return batch_norm(x, running_mean=None, running_var=None, weight=module.weight, bias=module.bias,
                          training=True, eps=module.eps)
    # Noise is shared over positions: summarize per channel, where the output moments are exact.
    _, second, shift_second = noise_moments(module)
    if isinstance(second, float) and isinstance(shift_second, float) and plain(x):  # BatchNorm's noise: fused
        mean, var = normalized(x.mean, x.var, module.weight, module.bias, module.eps, second, shift_second)
    else:
        mean, var = noisy_normalized_moments(x.var, module.weight, module.bias, module.eps, second, shift_second)
    return Moments.per_channel(mean, var, x.shape)


@moment_rule("batch_noise")
def batch_noise(x: Moments, *, module: BatchNoise, training: bool, **_) -> Moments:
    """``y = s (x - beta) + gamma t + beta`` with noise independent of x: per channel, with ``d = m - beta``,
    mean ``beta + E[s] d``, var ``E[s^2] (v + d^2) - E[s]^2 d^2 + gamma^2 E[t^2]`` (exact; ``E[s t] = 0``);
    identity in eval."""
    if not training:
        return x
    first, second, shift_second = noise_moments(module)
    mean, var = x.mean, x.var
    beta = module.bias if module.bias is not None else torch.zeros_like(mean)
    gamma2 = module.weight.square() if module.weight is not None else torch.ones_like(mean)
    offset = mean - beta
    out_var = second * (var + offset * offset) - first**2 * offset * offset + gamma2 * shift_second
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
    """NormProp's layer is a Linear/Conv with weight ``gamma W/sigma`` and bias ``beta - gamma mu/sigma``
    (``sigma = c ||W||``, ``mu = 0`` uncalibrated): the affine rule with them (AP2, independent inputs)."""
    return _layer_rule(x, module.layer, *module.effective_weight_and_bias(), out_shape)


def raw_layer_output(layer: nn.Module, x: Moments, out_shape: tuple[int, ...]) -> Moments:
    """Moments of a folded layer's output with its raw (unparametrized) weight and no bias: the activation a
    BatchNorm after it would have normalized, less the bias that the normalization cancels."""
    raw = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
    return _layer_rule(x, layer, raw, None, out_shape)


@moment_rule(REPARAM)
def reparameterized_layer(x: Moments, *, layer: nn.Module, out_shape: tuple[int, ...], **_) -> Moments:
    """A Linear/Conv with a BatchNorm folded into its weight, ``W_eff = gamma W/sigma``,
    ``b_eff = beta - gamma mu/sigma``: the batch form of BatchNorm (the analytic normalizer's rule) on the raw
    layer's output, so reparam and analytic propagate identically in every representation. Per channel that is
    ``(beta, gamma^2 v/(v + eps))`` with ``v = (W*W) v_in``; per unit, the raw layer's unit maps normalized by
    their channel mixture (exact)."""
    weight_parametrization = layer.parametrizations.weight[0]
    return batch_norm(raw_layer_output(layer, x, out_shape), running_mean=None, running_var=None,
                      weight=weight_parametrization.gamma, bias=layer.parametrizations.bias[0].beta, training=True,
                      eps=weight_parametrization.state.eps)


# Without noise the normalizer's moments do not depend on the mode: its flag is not read (graphnorm.program
# then records one statistics program for training and eval).
register_op(AnalyticNorm, "analytic_norm",
            lambda m, x, *_: ((x,), {"module": m, "training": m.stochastic_batch is not None and m.training}))
register_op(BatchNoise, "batch_noise", lambda m, x: ((x,), {"module": m, "training": m.training}))
register_op(ChannelAffine, "channel_affine", lambda m, x: ((x,), {"scale": m.scale, "shift": m.shift}))
register_op(NormPropLayer, "normprop_layer", lambda m, x: ((x,), {"module": m}))
register_op(FixedBatchNorm, "batch_norm", lambda m, x: ((x,), {
    "running_mean": m.running_mean, "running_var": m.running_var, "weight": m.weight, "bias": m.bias,
    "training": False, "eps": m.eps}))
register_instance_op(REPARAM, lambda m, x: ((x,), {"layer": m}))
register_op(folded_layer, REPARAM, lambda layer, x, *_: ((x,), {"layer": layer}))  # the form a converted graph calls


def is_reparameterized(module: nn.Module) -> bool:
    return getattr(module, "graphnorm_op", None) == REPARAM and parametrize.is_parametrized(module, "weight")
