"""The hot spot of moment propagation: per-channel kernel moments of a Linear/Conv weight, a custom op
(``graphnorm::kernel_moments``) with a hand-written backward.

For a weight ``W[O, C/g, *k]`` (groups g) and per-channel input moments ``(m, v)``:
``mean_o = sum_{c in group(o), k} W[o, c, k] m_c`` and ``var_o = sum_{c, k} W[o, c, k]^2 v_c`` (AP2).
Both are GEMVs over whole rows of the weight flattened to ``[O, C/g * taps]`` against the per-channel moments
repeated over the taps: a reduction over the few taps of each kernel (9 for a 3x3 conv) does not vectorize and
was 3x slower on ResNet-18 (``benchmarks/kernel_moments.py``). Written through autograd the backward would also
write an outer product and a squared-weight gradient; the hand-written backward produces the weight gradient
``dW = g_mean m_c + 2 W g_var v_c`` as one row scaling, one column scaling and a rank-1 update in place.
Being a registered op (``torch.library.custom_op`` with ``register_autograd``), it stays one op when the
statistics pass is recorded (:mod:`graphnorm.program`) or compiled, and keeps its fused backward there.
"""

from __future__ import annotations

from typing import Any

import torch


def _repeat_taps(values: torch.Tensor, groups: int, taps: int) -> torch.Tensor:
    """Per-channel ``values[C]`` repeated over the kernel taps, as rows ``[groups, 1, C/groups * taps]`` that
    line up with the weight flattened to ``[groups, O/groups, C/groups * taps]`` (a few KB, not a weight copy)."""
    return values.reshape(groups, -1, 1).expand(-1, -1, taps).reshape(groups, 1, -1)


def _grouped_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight ``[O, C/g, *k]`` as ``[g, O/g, C/g * taps]``: one contiguous row per output channel."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


@torch.library.custom_op("graphnorm::kernel_moments", mutates_args=())
def _kernel_moments_op(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W m, (W*W) v)`` as GEMVs over whole rows of the weight (the per-channel moments repeated over the
    taps), never a reduction over the few taps of a kernel. The squared weight is not an output (saved for the
    backward it would be a weight-sized tensor held through the step and, under torch.compile, given a
    weight-sized zero gradient); the backward squares again."""
    rows = _grouped_rows(weight, groups)
    taps = weight[0, 0].numel()
    square = rows * rows
    out_mean = torch.bmm(rows, _repeat_taps(mean, groups, taps).transpose(1, 2)).reshape(-1)
    out_var = torch.bmm(square, _repeat_taps(var, groups, taps).transpose(1, 2)).reshape(-1)
    return out_mean, out_var


@_kernel_moments_op.register_fake
def _(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int):
    return weight.new_empty(weight.shape[0]), weight.new_empty(weight.shape[0])


def _setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    weight, mean, var, groups = inputs
    ctx.save_for_backward(weight, mean, var)
    ctx.groups = groups


def _backward(ctx: Any, grad_mean: torch.Tensor, grad_var: torch.Tensor, *_):
    """``dW[o, c, k] = 2 W[o, c, k] g_var[o] v_c + g_mean[o] m_c``, written as a row scaling, a column
    scaling and a rank-1 update in place (elementwise broadcasts along contiguous rows; a broadcast over the
    few taps of a kernel would not vectorize). The input moments' gradients are GEMVs of the output gradients
    with ``W`` and ``W*W``, summed over the taps."""
    weight, mean, var = ctx.saved_tensors
    groups = ctx.groups
    rows = _grouped_rows(weight, groups)
    taps = weight[0, 0].numel()
    g_mean = grad_mean.reshape(groups, 1, -1)
    g_var = grad_var.reshape(groups, 1, -1)
    if torch.compiler.is_compiling():
        return (*_traced_gradients(ctx.needs_input_grad, rows, mean, var, g_mean, g_var, weight.shape),
                None)
    grad_weight = grad_in_mean = grad_in_var = None
    if ctx.needs_input_grad[0]:
        grad_weight = rows * _repeat_taps(var, groups, taps)
        grad_weight.mul_(2 * g_var.transpose(1, 2))
        grad_weight.baddbmm_(g_mean.transpose(1, 2), _repeat_taps(mean, groups, taps))
        grad_weight = grad_weight.reshape(weight.shape)
    if ctx.needs_input_grad[1]:
        grad_in_mean = torch.bmm(g_mean, rows).reshape(mean.shape[0], taps).sum(1)
    if ctx.needs_input_grad[2]:
        grad_in_var = torch.bmm(g_var, rows * rows).reshape(var.shape[0], taps).sum(1)
    return grad_weight, grad_in_mean, grad_in_var, None


def _traced_gradients(needs: tuple[bool, ...], rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                      g_mean: torch.Tensor, g_var: torch.Tensor, shape: torch.Size) -> tuple:
    """The same gradients as broadcasts and reductions over ``[g, O/g, C/g, taps]``, the form a compiler (which
    traces this backward) fuses into single loops; in eager mode the GEMV form above is faster."""
    groups, per_group_out = rows.shape[0], rows.shape[1]
    kernel = rows.reshape(groups, per_group_out, -1, shape[2:].numel())
    g_mean, g_var = g_mean.reshape(groups, -1, 1), g_var.reshape(groups, -1, 1)
    mean, var = mean.reshape(groups, 1, -1), var.reshape(groups, 1, -1)
    grad_weight = grad_in_mean = grad_in_var = None
    if needs[0]:
        grad_weight = torch.addcmul((g_mean * mean).unsqueeze(-1), kernel, (g_var * var).unsqueeze(-1), value=2.0)
        grad_weight = grad_weight.reshape(shape)
    if needs[1]:
        grad_in_mean = (kernel.sum(-1) * g_mean).sum(1).reshape(-1)
    if needs[2]:
        grad_in_var = ((kernel * kernel).sum(-1) * g_var).sum(1).reshape(-1)
    return grad_weight, grad_in_mean, grad_in_var


_kernel_moments_op.register_autograd(_backward, setup_context=_setup_context)


def kernel_moments(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W m, (W*W) v)`` per output channel of a Linear/Conv weight ``[O, C/g, *k]`` on per-channel input
    moments ``mean``/``var`` of length C (kernel summed over its taps)."""
    dtype = torch.promote_types(torch.promote_types(weight.dtype, mean.dtype), torch.float32)  # float32 or wider
    weight, mean, var = weight.to(dtype), mean.to(dtype), var.to(dtype)
    out_mean, out_var = _kernel_moments_op(weight, mean.contiguous(), var.contiguous(), groups)
    return out_mean, out_var
