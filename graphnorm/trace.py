"""Symbolic tracing with torch.fx, with the failures turned into actionable errors.

``trace`` returns a ``torch.fx.GraphModule`` whose node names are fx's own (deterministic: they derive from
the module paths and call order) and whose call nodes carry their canonical op key in
``node.meta["graphnorm.op"]`` (see :mod:`graphnorm.ops`). Leaf modules (``leaf_modules``) stay single
``call_module`` nodes; give them as module types or as qualified names (``"layer1.0"``).
"""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import fx

from .errors import TraceError, first_line
from .exported import EXPORT_CAPTURE, as_module, export_model, graph_module_from_export
from .graphs import has_batchnorm, parameter_dtype
from .ops import is_registered_module, op_key, registered_functions
from .shape_tracing import FAKE, ShapeTracer

__all__ = ["OP_KEY", "trace"]

OP_KEY = "graphnorm.op"
INPUT_NAMES = "graphnorm.input_names"  # the traced forward's parameter names, in placeholder order
CAPTURE = "graphnorm.capture"  # how the graph was captured: "symbolic", "symbolic with shapes", "torch.export"
SPECIALIZED = "graphnorm.specialized"  # source locations where the graph took a branch for the input shape

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRAPHNORM_DIR = os.path.dirname(os.path.abspath(__file__))


def _library_registrations() -> tuple[tuple[type, ...], tuple]:
    """Leaf module types and functions to keep as single calls, from libraries the process has imported
    already (nothing is imported here): timm's own fx registrations (the leaf modules and autowrapped functions
    its feature extraction uses) and the third-party functions graphnorm has rules for."""
    leaf_types: list[type] = []
    functions = list(registered_functions())
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is not None:
        leaf_types += list(timm_fx.get_notrace_modules())
        functions += [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return tuple(leaf_types), tuple(functions)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        library_leaves, functions = _library_registrations()
        super().__init__(autowrap_functions=functions)
        self.library_leaves = library_leaves
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if self.library_leaves and isinstance(m, self.library_leaves) and not has_batchnorm(m):
            return True  # a library's own leaf, unless it holds a BatchNorm that must be rewritten
        if is_registered_module(m):  # a module type with a moment rule is one call, not its insides
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module is the one to name
                try:
                    self.failed_module = self.path_of_module(m)
                except NameError:
                    self.failed_module = type(m).__name__
            raise


class _LeafRoot(nn.Module):
    """Holds a leaf module as the single submodule ``module`` so that tracing records one call to it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Any) -> Any:
        return self.module(x)


def _split_leaves(leaf_modules: Iterable[type | str]) -> tuple[tuple[type, ...], frozenset[str]]:
    types, names = [], []
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            names.append(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        else:
            raise TypeError(f"leaf_modules entries must be nn.Module types or qualified names, got {leaf!r}")
    return tuple(types), frozenset(names)


class _ShapeAwareTracer(ShapeTracer, _Tracer):
    pass


def trace(
    model: nn.Module | torch.export.ExportedProgram,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    input_shape: Iterable[int] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with canonical op keys in ``node.meta["graphnorm.op"]``.

    When plain symbolic tracing fails and ``input_shape`` is given, the model is traced again with proxies that
    know the shapes (:mod:`graphnorm.shape_tracing`): Python that branches on shapes takes its branch for that
    shape; when that fails too, it is captured with ``torch.export.export(strict=False)``, which runs its Python on
    fake tensors (:mod:`graphnorm.exported`). An ``ExportedProgram`` is taken as it is, its layers made modules
    again. ``graph_module.meta["graphnorm.capture"]`` says which path was taken and
    ``meta["graphnorm.specialized"]`` where the graph depends on the input shape. An existing GraphModule is
    re-tagged, not re-traced. The model is not modified.
    """
    model = as_module(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphnorm.trace needs an nn.Module or a torch.export.ExportedProgram, got "
                        f"{type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        tag_op_keys(model)
        return model
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    unknown = sorted(leaf_names - {name for name, _ in model.named_modules()})
    if unknown:
        raise TraceError(f"leaf_modules names {unknown} are not submodules of the model; check the spelling")
    tracer = _Tracer(leaf_types, leaf_names)
    if tracer.is_leaf_module(model, ""):
        # A lone leaf module (nn.Conv2d, nn.BatchNorm1d, ...) is traced as one call, not through its forward.
        model = _LeafRoot(model)
    capture, specialized = "symbolic", []
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:
        if input_shape is None:
            raise TraceError(_trace_failure_message(err, tracer.failed_module)) from err
        tracer = _ShapeAwareTracer(leaf_types, leaf_names)
        input_shape = tuple(int(s) for s in input_shape)
        try:
            graph = _trace_with_shapes(tracer, model, input_shape, concrete_args)
        except Exception as shaped_err:
            return _export_instead(model, input_shape, _trace_failure_message(shaped_err, tracer.failed_module))
        capture, specialized = "symbolic with shapes", list(tracer.specialized)
    name = type(model).__name__
    graph_module = fx.GraphModule(tracer.root, graph, name)
    for node in graph_module.graph.nodes:
        node.meta.pop(FAKE, None)
    graph_module.meta["graphnorm.traced_from"] = name
    graph_module.meta[INPUT_NAMES] = list(inspect.signature(model.forward).parameters)
    graph_module.meta[CAPTURE] = capture
    graph_module.meta[SPECIALIZED] = specialized
    tag_op_keys(graph_module)
    return graph_module


def _trace_with_shapes(tracer: _ShapeAwareTracer, model: nn.Module, input_shape: tuple[int, ...],
                       concrete_args: dict[str, Any] | None) -> fx.Graph:
    from torch._dynamo.utils import deepcopy_to_fake_tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    names = list(inspect.signature(model.forward).parameters)
    dtype = parameter_dtype(model)
    with fake_mode:
        sample = torch.empty((max(2, input_shape[0]), *input_shape[1:]), dtype=dtype)
    tracer.setup_shapes(fake_mode, deepcopy_to_fake_tensor(model, fake_mode), {names[0]: sample} if names else {})
    return tracer.trace(model, concrete_args=concrete_args)


def _export_instead(model: nn.Module, input_shape: tuple[int, ...], why: str) -> fx.GraphModule:
    """The last capture path: ``torch.export.export(strict=False)`` (:mod:`graphnorm.exported`)."""
    try:
        program = export_model(model, input_shape, parameter_dtype(model))
        graph_module = graph_module_from_export(program, EXPORT_CAPTURE + " (symbolic tracing failed)")
    except Exception as err:
        raise TraceError(f"{why}\ntorch.export.export(strict=False) could not capture the model either: "
                         f"{first_line(err)}") from err
    graph_module.meta["graphnorm.traced_from"] = type(model).__name__
    tag_op_keys(graph_module)
    return graph_module


def tag_op_keys(graph_module: fx.GraphModule) -> None:
    """Write the canonical op key of every node into ``node.meta["graphnorm.op"]`` (None if unknown)."""
    for node in graph_module.graph.nodes:
        node.meta[OP_KEY] = op_key(node, graph_module)


def _trace_failure_message(err: Exception, module_path: str | None) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    user_frames = [f for f in frames
                   if not os.path.abspath(f.filename).startswith((_TORCH_DIR, _GRAPHNORM_DIR))]
    where = ""
    if user_frames:
        frame = user_frames[-1]
        code = f": `{frame.line.strip()}`" if frame.line else ""
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno}{code}"
    module = f"module '{module_path}'" if module_path else "the model's own forward"
    reason = first_line(err)
    return (
        f"torch.fx could not trace {module}{where}: {reason}\n"
        "Fix: pass leaf_modules=[<that module's type or name>] to keep it as one opaque call (then register a "
        "moment rule for it), or concrete_args={...} to fix the argument that drives the Python control flow."
    )
