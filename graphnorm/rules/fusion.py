"""Fused forms: a rule's computation as one op whose backward is written in closed form (the statistics pass's
fast path).

A converted model runs its moment pass at every training step, with autograd. Written as the rules write it,
one ReLU's moments are some twenty small ops, each recorded by autograd and each given a backward node: on a
ResNet-18 the pass was 967 recorded ops, whose cost is their count and their bookkeeping, not arithmetic.
A :class:`FusedForm` is one such computation (the moments of a ReLU, of a clamp, of a smooth activation, of
BatchNorm's batch form, of the max of a window after a monotone activation) as a single op:

- its forward is the rule's own code (:meth:`FusedForm.reference`), run once without autograd;
- its backward is the derivative in closed form (:meth:`FusedForm.backward`): Stein-type identities and
  Leibniz's rule for piecewise polynomials (:mod:`graphnorm.rules.piecewise`), the same quadrature for smooth
  activations, the explicit formula for normalization.

Rules use a form through :func:`fused` when :func:`fusion_enabled` (the default) and their inputs carry no
refinement of the accurate mode; otherwise they compute as before. Under ``make_fx`` (the recording of a
statistics program, :mod:`graphnorm.program`) the form is one node, the custom op ``graphnorm::fused``; the
recorded program then calls :func:`fused_call` directly (no op dispatch), which runs the form as a
``torch.autograd.Function`` in eager mode and the differentiable reference under ``torch.compile`` (the
compiler derives and fuses its own backward). ``tests/rules/test_fusion.py`` checks every form's values and
gradients against autograd of its reference in float64.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["FusedCall", "FusedForm", "fused", "fused_call", "fusion", "fusion_enabled", "plain"]

Grads = Sequence[torch.Tensor | None]


class FusedForm:
    """One rule's computation on plain tensors, with its derivative in closed form. Subclasses are frozen
    dataclasses (hashable, picklable: recorded programs keep them) whose outputs have the shape of the first
    input."""

    outputs: int = 2

    def reference(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rule's own differentiable computation."""
        raise NotImplementedError

    def backward(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], grads: Grads,
                 residuals: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor | None, ...]:
        """The gradients of the inputs from those of the outputs (None: zero), in closed form; ``residuals`` are
        what :meth:`forward` kept (empty when the op was called through the dispatcher: recomputed)."""
        raise NotImplementedError

    def __reduce__(self) -> tuple:
        """Pickled by its defining fields (derived constants are recomputed: closures do not pickle)."""
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init)

    def forward(self, *inputs: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The outputs (the reference's values, without autograd) and residuals for :meth:`backward`."""
        with torch.no_grad():
            return tuple(self.reference(*inputs)), ()


_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("graphnorm_fusion", default=True)


def fusion_enabled() -> bool:
    """Whether rules use their fused forms (default True; :func:`fusion` switches)."""
    return _ENABLED.get()


@contextlib.contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Rules use their fused forms (True) or compute as their reference code writes it (False) in the block."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def plain(*operands: Any) -> bool:
    """Whether fused forms apply: fusion is on and no operand carries a refinement of the accurate mode
    (third cumulant, correlations), which only the reference code propagates."""
    if not fusion_enabled():
        return False
    return all(getattr(x, "third", None) is None and getattr(x, "neighbours", None) is None
               and getattr(x, "channel_correlation", None) is None and getattr(x, "correlation", None) is None
               for x in operands)


_FORMS: list[FusedForm] = []
_HANDLES: dict[FusedForm, int] = {}


def _handle(form: FusedForm) -> int:
    """The custom op's integer for ``form`` (forms are values: equal forms share one)."""
    if form not in _HANDLES:
        _HANDLES[form] = len(_FORMS)
        _FORMS.append(form)
    return _HANDLES[form]


@torch.library.custom_op("graphnorm::fused", mutates_args=())
def _fused_op(handle: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return _unaliased(_FORMS[handle].forward(*inputs)[0], inputs)


def _unaliased(results: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``results`` with those that share memory with an input (or each other) copied: a custom op's outputs
    alias nothing."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    unaliased = []
    for t in results:
        pointer = t.untyped_storage().data_ptr()
        unaliased.append(t.clone() if pointer in seen else t)
        seen.add(pointer)
    return unaliased


@_fused_op.register_fake
def _(handle: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(inputs[0]) for _ in range(_FORMS[handle].outputs)]


def _setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    handle, tensors = inputs
    ctx.form, ctx.handle = _FORMS[handle], handle
    ctx.save_for_backward(*tensors, *output)
    ctx.count = len(tensors)


@torch.library.custom_op("graphnorm::fused_backward", mutates_args=())
def _fused_backward_op(handle: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                       grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """A form's backward as an op of its own, so that a compiler keeps it whole (a library call, like the
    forward) instead of tracing its closed form into generated code (input gradients it has none for: 0)."""
    results = _FORMS[handle].backward(inputs, outputs, grads)
    results = [torch.zeros_like(t) if g is None else g for g, t in zip(results, inputs, strict=True)]
    return _unaliased(results, [*inputs, *outputs, *grads])


@_fused_backward_op.register_fake
def _(handle, inputs, outputs, grads):
    return [torch.empty_like(t) for t in inputs]


def _op_backward(ctx: Any, grads: list[torch.Tensor | None]):
    saved = ctx.saved_tensors
    inputs, outputs = saved[: ctx.count], saved[ctx.count:]
    if torch.compiler.is_compiling():
        grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs, strict=True)]
        return None, _fused_backward_op(ctx.handle, list(inputs), list(outputs), grads)
    return None, list(ctx.form.backward(inputs, outputs, grads))


_fused_op.register_autograd(_op_backward, setup_context=_setup_context)


class _FusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, form: FusedForm, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs, residuals = form.forward(*inputs)
        ctx.form = form
        ctx.counts = (len(inputs), len(inputs) + len(outputs))
        ctx.save_for_backward(*inputs, *outputs, *residuals)
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        saved = ctx.saved_tensors
        inputs, outputs = ctx.counts
        return None, *ctx.form.backward(saved[:inputs], saved[inputs:outputs], grads, saved[outputs:])


def fused(form: FusedForm, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``form`` applied to ``inputs`` as one op (the custom op ``graphnorm::fused``): what rules call. Under
    ``torch.compile`` (rules traced by the compiler, no recorded program) the differentiable reference: the
    registry of forms is Python state the compiler would have to trace and guard on."""
    if torch.compiler.is_compiling():
        return tuple(form.reference(*inputs))
    return tuple(_fused_op(_handle(form), list(inputs)))


def fused_call(form: FusedForm, inputs: Sequence[torch.Tensor], handle: int | None = None) -> tuple[torch.Tensor, ...]:
    """``form`` as a recorded statistics program calls it: a ``torch.autograd.Function`` in eager mode (no op
    dispatch, no autograd node per op). Under ``torch.compile`` on a CPU, the custom op, forward and backward
    each one library call of the compiled graph (generated C++ for these small ops is no faster than eager and
    takes long to generate); on a GPU the differentiable reference, which the compiler fuses with its
    neighbours into a few kernels (there every op is a kernel launch). ``handle`` is the form's integer for the
    custom op, looked up before compiling (:class:`FusedCall` keeps it)."""
    if torch.compiler.is_compiling():
        if inputs[0].device.type == "cpu" and handle is not None:
            return tuple(_fused_op(handle, list(inputs)))
        return tuple(form.reference(*inputs))
    return _FusedFunction.apply(form, *inputs)


class FusedCall(torch.nn.Module):
    """One fused op of a recorded statistics program (a submodule, so that the program's code calls it by name
    and survives pickling, which re-traces that code with every submodule a leaf)."""

    def __init__(self, form: FusedForm):
        super().__init__()
        self.form = form
        self.handle = _handle(form)

    def __setstate__(self, state: dict) -> None:
        # the integer is this process's: a copy or an unpickled program looks its form up again
        super().__setstate__(state)
        self.handle = _handle(self.form)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return fused_call(self.form, inputs, self.handle)

    def extra_repr(self) -> str:
        return repr(self.form)


def form_of(handle: int) -> FusedForm:
    """The form behind a recorded ``graphnorm::fused`` node's integer."""
    return _FORMS[handle]
