"""Weight-sized memory reused from step to step.

On a CPU, writing a weight-sized result into freshly allocated memory costs two to four times writing it into
memory already in use (the page faults of a new allocation; ``benchmarks/train_step.py --profile "graphnorm
analytic"`` shows the ops), and a training step of a weight-normalized network writes several such results. A
:class:`Workspace` belongs to one call site and keeps its buffer between steps; :func:`scratch` is a per-thread
buffer for a result used at once. A buffer is handed out again only when nothing else holds it (its use count), so
a gradient autograd or a hook still holds is never overwritten, and never for fake, traced or wrapped tensors.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["Workspace", "plain_tensors", "scratch"]


def _unshared(buffer: torch.Tensor | None, like: torch.Tensor) -> bool:
    """Whether ``buffer`` can receive a result shaped like ``like``: same shape, dtype and device, and no other
    reference to it (a gradient autograd or a hook still holds, a view)."""
    return (buffer is not None and buffer.shape == like.shape and buffer.dtype == like.dtype
            and buffer.device == like.device and buffer._use_count() == 1)


class Workspace:
    """The weight-sized buffer one call site reuses from step to step: a forward fills it (:meth:`take`) with
    something its backward claims back (:meth:`claim`: the kernel moments keep the squared weight), and the
    backward may then write the gradient it hands to autograd into it (autograd adds it in place to the
    layer's own gradient and lets it go). A copy or a pickle starts empty."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._token = 0  # counts forwards; the one whose result the buffer holds is _holds
        self._holds: int | None = None

    def take(self, like: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A buffer shaped like ``like`` for a forward, and the token that claims it back."""
        if not _unshared(self._buffer, like):
            self._buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._token += 1
        self._holds = self._token
        return self._buffer, self._token

    def claim(self, token: int) -> torch.Tensor | None:
        """What forward ``token`` left, once (None if a later forward took the buffer, or it was claimed
        already: a second backward through a retained graph)."""
        if self._holds != token:
            return None
        self._holds = None
        return self._buffer

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()


_SCRATCH = threading.local()


def scratch(like: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like ``like`` for a result used at once (a forward without backward: eval, no_grad),
    one per thread, dtype and device, grown as needed."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (like.dtype, like.device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < like.numel() or buffer._use_count() > 1:
        buffer = buffers[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buffer[: like.numel()].view(like.shape)


def plain_tensors(*tensors: torch.Tensor) -> bool:
    """Plain eager tensors: no fake tensor (shape inference, export), subclass or functorch wrapper (vmap,
    grad), for which reusing memory across calls would be wrong; none under torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)
               for t in tensors)


