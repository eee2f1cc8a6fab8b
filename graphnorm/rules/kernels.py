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
statistics pass is recorded (:mod:`graphnorm.program`).

A recorded statistics program calls :func:`kernel_moments_call` instead, with a :class:`Workspace` of its own per
call site. Memory traffic, not arithmetic, is the cost of these ops on a CPU, and writing a weight-sized result
into freshly allocated memory costs two to four times writing it into memory already in use (page faults;
``benchmarks/train_step.py --profile "graphnorm analytic"``). So a training step allocates no weight-sized tensor
here: the forward squares the weight into the site's workspace and keeps it for the backward (one squaring per step
instead of two), the backward writes the weight gradient into the same memory and hands it to autograd, which adds
it in place to the layer's own gradient. The workspace is taken again only when nothing else holds it (its use
count), so a gradient autograd or a hook still holds is never overwritten. Under ``torch.compile`` the call is the
custom op on a CPU (the compiler's own loops for a GEMV do not vectorize there) and the GEMVs through autograd on a
GPU (the compiler fuses the backward's weight gradient into one pass), both without workspaces.
"""

from __future__ import annotations

from typing import Any

import torch

from ..workspace import Workspace, plain_tensors, scratch

__all__ = ["KernelMomentsCall", "kernel_moments", "kernel_moments_call"]


def _repeat_taps(values: torch.Tensor, groups: int, taps: int) -> torch.Tensor:
    """Per-channel ``values[C]`` repeated over the kernel taps, as rows ``[groups, 1, C/groups * taps]`` that
    line up with the weight flattened to ``[groups, O/groups, C/groups * taps]`` (a few KB, not a weight copy)."""
    return values.reshape(groups, -1, 1).expand(-1, -1, taps).reshape(groups, 1, -1)


def _grouped_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight ``[O, C/g, *k]`` as ``[g, O/g, C/g * taps]``: one contiguous row per output channel."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def _taps(weight: torch.Tensor) -> int:
    return weight[0, 0].numel()


def _moments(rows: torch.Tensor, square: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int,
             taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W m, (W*W) v)`` from the weight rows and their squares: two GEMVs."""
    out_mean = torch.bmm(rows, _repeat_taps(mean, groups, taps).transpose(1, 2)).reshape(-1)
    out_var = torch.bmm(square, _repeat_taps(var, groups, taps).transpose(1, 2)).reshape(-1)
    return out_mean, out_var


def _gradients(needs: tuple[bool, ...], weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int,
               grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None, square: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """``(dW, dm, dv)`` for output gradients ``(g_mean, g_var)`` (None: zero), each computed only where
    ``needs`` says. ``dW[o, c, k] = 2 W[o, c, k] g_var[o] v_c + g_mean[o] m_c`` as a row scaling, a column
    scaling and a rank-1 update in place (broadcasts along contiguous rows; one over the few taps of a kernel
    would not vectorize); ``dm``, ``dv``: GEMVs of the output gradients with ``W`` and ``W*W``, summed over the
    taps. ``square`` is ``W*W`` if the caller has it; ``out`` receives ``dW`` (else a new tensor)."""
    rows, taps = _grouped_rows(weight, groups), _taps(weight)
    g_mean = None if grad_mean is None else grad_mean.reshape(groups, 1, -1)
    g_var = None if grad_var is None else grad_var.reshape(groups, 1, -1)
    grad_weight = grad_in_mean = grad_in_var = None
    if needs[2] and g_var is not None:  # before dW, which may overwrite the square (out is square)
        square = rows * rows if square is None else square
        grad_in_var = torch.bmm(g_var, square).reshape(var.shape[0], taps).sum(1)
    if needs[1] and g_mean is not None:
        grad_in_mean = torch.bmm(g_mean, rows).reshape(mean.shape[0], taps).sum(1)
    if needs[0] and (g_mean is not None or g_var is not None):
        grad_weight = torch.empty_like(rows) if out is None else out
        if g_var is None:
            grad_weight.zero_()
        else:
            torch.mul(rows, _repeat_taps(var, groups, taps), out=grad_weight)
            grad_weight.mul_(2 * g_var.transpose(1, 2))
        if g_mean is not None:
            grad_weight.baddbmm_(g_mean.transpose(1, 2), _repeat_taps(mean, groups, taps))
        grad_weight = grad_weight.view(weight.shape)
    return grad_weight, grad_in_mean, grad_in_var


@torch.library.custom_op("graphnorm::kernel_moments", mutates_args=())
def _kernel_moments_op(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W m, (W*W) v)`` as GEMVs over whole rows of the weight (the per-channel moments repeated over the
    taps), never a reduction over the few taps of a kernel. The squared weight is not an output (saved for the
    backward it would be a weight-sized tensor held through the step); the backward squares again."""
    rows = _grouped_rows(weight, groups)
    return _moments(rows, rows * rows, mean, var, groups, _taps(weight))


@_kernel_moments_op.register_fake
def _(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int):
    return weight.new_empty(weight.shape[0]), weight.new_empty(weight.shape[0])


@torch.library.custom_op("graphnorm::kernel_moments_backward", mutates_args=())
def _kernel_moments_backward_op(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int,
                                grad_mean: torch.Tensor, grad_var: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward as an op of its own, so that a compiler keeps it whole (a library call, like the forward)
    instead of tracing it into generated loops."""
    return _gradients((True, True, True), weight, mean, var, groups, grad_mean, grad_var)


@_kernel_moments_backward_op.register_fake
def _(weight, mean, var, groups, grad_mean, grad_var):
    return torch.empty_like(weight), torch.empty_like(mean), torch.empty_like(var)


def _setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    weight, mean, var, groups = inputs
    ctx.save_for_backward(weight, mean, var)
    ctx.groups = groups


def _backward(ctx: Any, grad_mean: torch.Tensor, grad_var: torch.Tensor, *_):
    weight, mean, var = ctx.saved_tensors
    if torch.compiler.is_compiling():
        zero = weight.new_zeros(weight.shape[0])
        grads = _kernel_moments_backward_op(weight, mean, var, ctx.groups,
                                            zero if grad_mean is None else grad_mean,
                                            zero if grad_var is None else grad_var)
        return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad, strict=False)), None)
    return (*_gradients(ctx.needs_input_grad, weight, mean, var, ctx.groups, grad_mean, grad_var), None)


_kernel_moments_op.register_autograd(_backward, setup_context=_setup_context)


def kernel_moments(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W m, (W*W) v)`` per output channel of a Linear/Conv weight ``[O, C/g, *k]`` on per-channel input
    moments ``mean``/``var`` of length C (kernel summed over its taps)."""
    dtype = torch.promote_types(torch.promote_types(weight.dtype, mean.dtype), torch.float32)  # float32 or wider
    weight, mean, var = weight.to(dtype), mean.to(dtype), var.to(dtype)
    out_mean, out_var = _kernel_moments_op(weight, mean.contiguous(), var.contiguous(), groups)
    return out_mean, out_var


class _KernelMoments(torch.autograd.Function):
    """:func:`kernel_moments` with the site's :class:`Workspace` (eager training)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int,
                workspace: Workspace | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows, taps = _grouped_rows(weight, groups), _taps(weight)
        backward = workspace is not None and any(ctx.needs_input_grad[:3])
        square, token = workspace.take(rows) if backward else (scratch(rows), None)
        torch.mul(rows, rows, out=square)
        out_mean, out_var = _moments(rows, square, mean, var, groups, taps)
        ctx.save_for_backward(weight, mean, var)
        ctx.groups, ctx.workspace, ctx.token = groups, workspace, token
        ctx.set_materialize_grads(False)
        return out_mean, out_var

    @staticmethod
    def backward(ctx: Any, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None):
        weight, mean, var = ctx.saved_tensors
        square = None
        if ctx.token is not None and not torch.is_grad_enabled():  # create_graph: a fresh, differentiable path
            square = ctx.workspace.claim(ctx.token)
        grads = _gradients(ctx.needs_input_grad, weight, mean, var, ctx.groups, grad_mean, grad_var, square,
                           out=square)
        return (*grads, None, None)


def _compiled_form(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMVs through autograd, for the compiler: matrix products stay library calls (whose inputs are
    materialized once), and autograd then the compiler turn the backward into one fused pass for the weight
    gradient. (As reductions along the weight rows instead, the compiler folds each layer's input moments into
    the reduction and recomputes them for every weight: 6x slower than eager on ResNet-18.)"""
    rows, taps = _grouped_rows(weight, groups), _taps(weight)
    return _moments(rows, rows * rows, mean, var, groups, taps)


def kernel_moments_call(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int,
                        workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kernel_moments` as a recorded statistics program calls it (module docstring): with the call
    site's workspace in eager mode; the custom op (forward and backward library calls) for tensors that are not
    plain (fake tensors, functorch transforms) and under ``torch.compile`` on a CPU; the GEMVs through autograd
    under ``torch.compile`` on a GPU, where the compiler fuses the backward's elementwise work."""
    if torch.compiler.is_compiling() and weight.device.type != "cpu":
        return _compiled_form(weight, mean, var, groups)
    if torch.compiler.is_compiling() or not plain_tensors(weight, mean, var):
        return _kernel_moments_op(weight, mean, var, groups)
    return _KernelMoments.apply(weight, mean, var, groups, workspace)


class KernelMomentsCall(torch.nn.Module):
    """One kernel-moments op of a recorded statistics program, with its call site's :class:`Workspace` (a
    submodule, so that the program's code calls it by name and survives pickling)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups
        self.workspace = Workspace()

    def forward(self, weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel_moments_call(weight, mean, var, self.groups, self.workspace)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
