"""The hot spot of moment propagation: per-channel kernel moments of a Linear/Conv weight, a custom op
(``graphnorm::kernel_moments``) with a hand-written backward.

For a weight ``W[O, C/g, *k]`` (groups g) and per-channel input moments ``(m, v)``:
``mean_o = sum_{c in group(o), k} W[o, c, k] m_c`` and ``var_o = sum_{c, k} W[o, c, k]^2 v_c`` (AP2).
Written through autograd this squares and reduces every weight in the forward, then writes an outer product and
a squared-weight gradient in the backward; the hand-written backward produces the weight gradient
``dW = g_mean m_c + 2 W g_var v_c`` in one fused pass. ``benchmarks/train_step.py`` measures the effect.
Being a registered op (``torch.library.custom_op`` with ``register_autograd``), it stays one op when the
statistics pass is recorded (:mod:`graphnorm.program`) or compiled, and keeps its fused backward there.
"""

from __future__ import annotations

from typing import Any

import torch


def _kernel_sums(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums and row sums of squares of ``flat [R, K]`` as a GEMV and a batched dot (no squared copy)."""
    ones = torch.ones(flat.shape[1], 1, dtype=flat.dtype, device=flat.device)
    sums = (flat @ ones).squeeze(1)
    squares = torch.einsum("rk,rk->r", flat, flat)
    return sums, squares


@torch.library.custom_op("graphnorm::kernel_moments", mutates_args=())
def _kernel_moments_op(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W m, (W*W) v, kernel sums, kernel sums of squares)``; the sums are outputs so that the backward
    reuses them (a custom op's context may save its outputs, not its intermediates)."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    sums, squares = _kernel_sums(weight.reshape(out_channels * per_group, -1))
    sums = sums.reshape(groups, out_channels // groups, per_group)
    squares = squares.reshape(groups, out_channels // groups, per_group)
    out_mean = torch.bmm(sums, mean.reshape(groups, per_group, 1)).reshape(out_channels)
    out_var = torch.bmm(squares, var.reshape(groups, per_group, 1)).reshape(out_channels)
    return out_mean, out_var, sums, squares


@_kernel_moments_op.register_fake
def _(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int):
    out_channels, per_group = weight.shape[0], weight.shape[1]
    sums = weight.new_empty((groups, out_channels // groups, per_group))
    return weight.new_empty(out_channels), weight.new_empty(out_channels), sums, torch.empty_like(sums)


def _setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    weight, mean, var, groups = inputs
    ctx.save_for_backward(weight, mean, var, output[2], output[3])
    ctx.groups = groups


def _backward(ctx: Any, grad_mean: torch.Tensor, grad_var: torch.Tensor, *_):
    """``dW[o, c, k] = g_mean[o] m_c + 2 W[o, c, k] g_var[o] v_c`` in one fused pass; the input moments'
    gradients are the kernel sums against the output gradients."""
    weight, mean, var, sums, squares = ctx.saved_tensors
    groups = ctx.groups
    out_channels, per_group = weight.shape[0], weight.shape[1]
    g_mean = grad_mean.reshape(groups, out_channels // groups, 1)
    g_var = grad_var.reshape(groups, out_channels // groups, 1)
    shaped = weight.reshape(groups, out_channels // groups, per_group, -1)
    grad_weight = grad_in_mean = grad_in_var = None
    if ctx.needs_input_grad[0]:
        d_sums = g_mean * mean.reshape(groups, 1, per_group)
        d_squares = g_var * var.reshape(groups, 1, per_group)
        grad_weight = torch.addcmul(d_sums.unsqueeze(-1), shaped, d_squares.unsqueeze(-1), value=2.0)
        grad_weight = grad_weight.reshape(weight.shape)
    if ctx.needs_input_grad[1]:
        grad_in_mean = (sums * g_mean).sum(1).reshape(-1)
    if ctx.needs_input_grad[2]:
        grad_in_var = (squares * g_var).sum(1).reshape(-1)
    return grad_weight, grad_in_mean, grad_in_var, None


_kernel_moments_op.register_autograd(_backward, setup_context=_setup_context)


def kernel_moments(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W m, (W*W) v)`` per output channel of a Linear/Conv weight ``[O, C/g, *k]`` on per-channel input
    moments ``mean``/``var`` of length C (kernel summed over its taps)."""
    mean, var = mean.to(weight.dtype), var.to(weight.dtype)
    out_mean, out_var, _, _ = _kernel_moments_op(weight, mean.contiguous(), var.contiguous(), groups)
    return out_mean, out_var
