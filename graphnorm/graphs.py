"""Small helpers on modules and fx graphs that several passes share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import fx

__all__ = ["ancestors", "attribute_value", "has_batchnorm", "parameter_dtype"]


def has_batchnorm(module: nn.Module) -> bool:
    """True when the module or one of its submodules is a BatchNorm."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter (the default dtype if it has none)."""
    parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
    return parameter.dtype if parameter is not None else torch.get_default_dtype()


def ancestors(graph: fx.Graph, names: Iterable[str]) -> set[str]:
    """The nodes named ``names`` and every node they depend on (names that are not in the graph are ignored)."""
    needed = set(names)
    for node in reversed(graph.nodes):
        if node.name in needed:
            needed.update(arg.name for arg in node.all_input_nodes)
    return needed


def attribute_value(graph_module: fx.GraphModule, value: Any) -> Any:
    """The tensor a ``get_attr`` node names; values that are not nodes as they are; LookupError (with the node's
    name) for a node computed in the graph."""
    if isinstance(value, fx.Node):
        if value.op != "get_attr":
            raise LookupError(value.name)
        target: Any = graph_module
        for part in str(value.target).split("."):
            target = getattr(target, part)
        return target
    return value
