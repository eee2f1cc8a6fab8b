"""Shape-aware symbolic tracing: proxies that know the shapes of the input graphnorm is given.

Plain ``torch.fx`` tracing fails on Python that branches on shapes (timm's same padding
``if pad_h or pad_w``, ``math.ceil(x / stride)``, MobileViT's ``if new_h != H``). graphnorm always knows the
input shape, so, in the spirit of the tracer Hugging Face Transformers uses, every proxy here also carries a
fake tensor (no data, no compute; ``torch._subclasses.FakeTensorMode``) computed by running each recorded op
on the fake values of its arguments. Then:

- ``x.size()``/``x.shape`` give the concrete sizes of the sample dims and a proxy for the batch dim (so the
  graph still runs at any batch size), ``x.dim()``/``x.ndim`` a concrete rank; each source line that read a
  concrete size is recorded, since the graph is specialized to the input's sample shape there;
- a proxy used as a Python bool (``if``, ``and``, ``assert``) takes the branch its fake value takes, and the
  place is recorded: the graph is specialized to that input shape there;
- a proxy holding a tuple can be unpacked and iterated.

A value that depends on the data (``if x.sum() > 0``) is not known to fake tensors and still fails to trace.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch import fx
from torch.fx.node import map_aggregate

FAKE = "graphnorm.fake_value"

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRAPHNORM_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_location() -> str:
    """``file:line`` of the innermost frame outside torch and graphnorm (the model's own code)."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if not path.startswith((_TORCH_DIR, _GRAPHNORM_DIR)):
            code = f": `{frame.line.strip()}`" if frame.line else ""
            return f"{os.path.basename(frame.filename)}:{frame.lineno}{code}"
    return "unknown location"


class ShapedProxy(fx.Proxy):
    """A proxy whose sizes (except the batch dim) and Python truth value come from its fake tensor."""

    def _fake(self) -> Any:
        return self.node.meta.get(FAKE)

    def size(self, dim: int | None = None) -> Any:
        value = self._fake()
        if not isinstance(value, torch.Tensor):
            extra = () if dim is None else (dim,)
            return self.tracer.create_proxy("call_method", "size", (self, *extra), {})
        if dim is not None and dim % value.dim() == 0:
            return self.tracer.create_proxy("call_method", "size", (self, dim), {})
        self.tracer.record_specialization()
        if dim is None:
            batch = self.tracer.create_proxy("call_method", "size", (self, 0), {})
            return (batch, *(int(s) for s in value.shape[1:]))
        return int(value.shape[dim])

    @property
    def shape(self) -> Any:
        return self.size()

    def dim(self) -> Any:
        value = self._fake()
        if isinstance(value, torch.Tensor):
            return value.dim()
        return self.tracer.create_proxy("call_method", "dim", (self,), {})

    @property
    def ndim(self) -> Any:
        return self.dim()

    def __len__(self) -> int:
        value = self._fake()
        if isinstance(value, (tuple, list)):
            return len(value)
        return super().__len__()


class ShapeTracer:
    """Mixin for an ``fx.Tracer``: records a fake value for every proxy and answers shape questions with it.

    ``fake_inputs`` maps placeholder names to fake tensors; ``fake_root`` is a fake copy of the traced module
    (its parameters and buffers fake, so running submodules on fake values touches nothing real).
    """

    def setup_shapes(self, fake_mode: Any, fake_root: nn.Module, fake_inputs: dict[str, torch.Tensor]) -> None:
        self.fake_mode = fake_mode
        self.fake_root = fake_root
        self.fake_inputs = fake_inputs
        self.specialized: list[str] = []

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, fx.Proxy):
            proxy.node.meta[FAKE] = self._evaluate(kind, target, args, kwargs, proxy.node)
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict, node: fx.Node) -> Any:
        if kind == "placeholder":
            return self.fake_inputs.get(node.name)
        unknown = []

        def fake_of(value: Any) -> Any:
            if isinstance(value, fx.Proxy):
                fake = value.node.meta.get(FAKE)
                if fake is None:
                    unknown.append(value)
                return fake
            return value

        fake_args = map_aggregate(args, fake_of)
        fake_kwargs = map_aggregate(kwargs, fake_of)
        if unknown:
            return None
        try:
            with self.fake_mode, torch.no_grad(), _unpatched_modules():
                if kind == "call_function":
                    return target(*fake_args, **fake_kwargs)
                if kind == "call_method":
                    return getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
                if kind == "call_module":
                    return self.fake_root.get_submodule(target)(*fake_args, **fake_kwargs)
                if kind == "get_attr":
                    value: Any = self.fake_root
                    for part in str(target).split("."):
                        value = getattr(value, part)
                    return value
        except Exception:
            return None
        return None

    def record_specialization(self) -> None:
        """Note the model's source line that read a concrete size or branched on one (once per line)."""
        where = _user_location()
        if where not in self.specialized:
            self.specialized.append(where)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = obj.node.meta.get(FAKE)
        if isinstance(value, (bool, int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1
                                                     and not _is_fake(value)):
            self.record_specialization()
            return bool(value)
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy):
        value = obj.node.meta.get(FAKE)
        if isinstance(value, (tuple, list)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)


@contextlib.contextmanager
def _unpatched_modules() -> Iterator[None]:
    """Run modules for real (on fake tensors) while fx's tracer has patched ``nn.Module.__call__`` and
    ``__getattr__`` to record calls: the originals, as fx saved them, are restored for the duration."""
    from torch.fx import _symbolic_trace

    patched_call, patched_getattr = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__ = _symbolic_trace._orig_module_call
    nn.Module.__getattr__ = _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__ = patched_call
        nn.Module.__getattr__ = patched_getattr


def _is_fake(value: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)
