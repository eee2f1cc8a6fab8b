"""Symbolic tracing with torch.fx, with the failures turned into actionable errors.

``trace`` returns a ``torch.fx.GraphModule`` whose node names are fx's own (deterministic: they derive from
the module paths and call order) and whose call nodes carry their canonical op key in
``node.meta["graphnorm.op"]`` (see :mod:`graphnorm.ops`). Leaf modules (``leaf_modules``) stay single
``call_module`` nodes; give them as module types or as qualified names (``"layer1.0"``).
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import fx

from .errors import TraceError, first_line
from .ops import op_key

__all__ = ["OP_KEY", "trace"]

OP_KEY = "graphnorm.op"
INPUT_NAMES = "graphnorm.input_names"  # the traced forward's parameter names, in placeholder order

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRAPHNORM_DIR = os.path.dirname(os.path.abspath(__file__))


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
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


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with canonical op keys in ``node.meta["graphnorm.op"]``.

    An existing GraphModule is re-tagged, not re-traced. The model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphnorm.trace needs an nn.Module, got {type(model).__name__}")
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
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:
        raise TraceError(_trace_failure_message(err, tracer.failed_module)) from err
    name = type(model).__name__
    graph_module = fx.GraphModule(tracer.root, graph, name)
    graph_module.meta["graphnorm.traced_from"] = name
    graph_module.meta[INPUT_NAMES] = list(inspect.signature(model.forward).parameters)
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
