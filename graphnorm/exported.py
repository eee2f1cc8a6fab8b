"""Capture with ``torch.export``: an ``ExportedProgram`` as a graph graphnorm rewrites like a traced one.

Two ways in: a program the user exported (``torch.export.export``, or a ``.pt2`` file from
``torch.export.save``), and the last capture path of :func:`graphnorm.trace`, for models that symbolic tracing
cannot capture even with shapes (``torch.export.export(strict=False)`` runs the model's Python on fake
tensors, so Python that reads tensor properties evaluates as it would in eager mode).

``ExportedProgram.module()`` gives a GraphModule of ATen calls whose parameters are ``get_attr`` nodes; the ATen
spellings (:mod:`graphnorm.aten_spellings`) give those calls their op keys. To make the graph the one
:func:`graphnorm.convert` expects from symbolic tracing, :func:`graph_module_from_export` then

- rewrites multi-output variants whose extra outputs are unused (``aten._native_batch_norm_legit_no_training``,
  ``aten.max_pool2d_with_indices``, ...) to their one-output forms;
- turns each convolution, linear and BatchNorm call whose weights are parameters of the program into a call of
  the ``nn`` layer it came from, holding the same parameter objects, at its original module path (so folding a
  BatchNorm into its convolution, calibration and the reports see the same modules, with the same names);
- drops the BatchNorm's in-place ``num_batches_tracked += 1`` (the layer counts its own batches) and the
  program's input guard (graphnorm checks the input shape itself);
- replaces the pytree calling convention by plain positional inputs and outputs where they are plain tensors.

The batch dim is exported dynamic (``Dim.AUTO``), so the converted model runs at any batch size; where the
model fixes it (a reshape to a literal batch size), the capture path in the log says so.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch import fx

from .graphs import attribute_value
from .ops import spelling_of

__all__ = ["EXPORT_CAPTURE", "as_module", "export_model", "graph_module_from_export", "is_exported_program"]

EXPORT_CAPTURE = "torch.export"

aten = torch.ops.aten


def is_exported_program(value: Any) -> bool:
    return isinstance(value, torch.export.ExportedProgram)


@contextlib.contextmanager
def _torch_warnings_silenced() -> Iterator[None]:
    """torch.export logs its failures (with the whole partial graph) as warnings; graphnorm reports them in one
    line of its own error instead."""
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        torch_logger.setLevel(level)


def export_model(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> torch.export.ExportedProgram:
    """``torch.export.export(model, strict=False)`` on an input of ``input_shape`` (batch at least 2, so that
    the batch dim is not specialized to 1) with a dynamic batch dim."""
    names = list(inspect.signature(model.forward).parameters)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((max(2, input_shape[0]), *input_shape[1:]), generator=generator, dtype=dtype)
    dynamic = {names[0]: {0: torch.export.Dim.AUTO}} if names else None
    with _torch_warnings_silenced():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic, strict=False)


def batch_is_dynamic(graph_module: fx.GraphModule) -> bool:
    """Whether the first input's batch dim stayed symbolic in the captured graph."""
    placeholder = next(n for n in graph_module.graph.nodes if n.op == "placeholder")
    value = placeholder.meta.get("val")
    return value is None or not isinstance(value.shape[0], int)


# -- one-output forms ----------------------------------------------------------------------------------------------
def _batch_norm_args(node: fx.Node) -> tuple | None:
    """``aten.batch_norm`` arguments of a multi-output BatchNorm variant."""
    args = list(node.args)
    if node.target == aten._native_batch_norm_legit_no_training.default:
        x, weight, bias, mean, var, momentum, eps = args
        return x, weight, bias, mean, var, False, momentum, eps, False
    if node.target in (aten._native_batch_norm_legit.default, aten.native_batch_norm.default):
        x, weight, bias, mean, var, training, momentum, eps = args
        return x, weight, bias, mean, var, training, momentum, eps, False
    if node.target == aten._native_batch_norm_legit.no_stats:
        x, weight, bias, training, momentum, eps = args
        return x, weight, bias, None, None, training, momentum, eps, False
    return None


_ONE_OUTPUT_FORMS = {aten.max_pool2d_with_indices.default: aten.max_pool2d.default}


def _use_one_output_forms(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        batch_norm_args = _batch_norm_args(node)
        if batch_norm_args is None and node.target not in _ONE_OUTPUT_FORMS:
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
            continue
        if any(u.args[1] != 0 and u.users for u in users):
            continue  # an extra output (saved statistics, pooling indices) is used
        with graph.inserting_before(node):
            if batch_norm_args is not None:
                single = graph.call_function(aten.batch_norm.default, batch_norm_args)
            else:
                single = graph.call_function(_ONE_OUTPUT_FORMS[node.target], node.args, node.kwargs)
        single.meta = {**node.meta, "val": node.meta["val"][0] if "val" in node.meta else None}
        for user in users:
            if user.args[1] == 0:
                user.replace_all_uses_with(single)
            graph.erase_node(user)
        graph.erase_node(node)


# -- layers as modules ------------------------------------------------------------------------------------------
def _size(value: Any) -> Any:
    """An int or a tuple, as the nn layers take them (ATen passes lists)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _conv_layer(params: dict[str, Any]) -> nn.Module:
    weight, bias = params["weight"], params["bias"]
    layer_type = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[weight.dim()]
    groups = int(params["groups"])
    layer = layer_type(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                       stride=_size(params["stride"]), padding=_size(params["padding"]),
                       dilation=_size(params["dilation"]),
                       groups=groups, bias=bias is not None, device="meta")
    layer.weight = weight
    layer.bias = bias
    return layer


def _linear_layer(params: dict[str, Any]) -> nn.Module:
    weight, bias = params["weight"], params["bias"]
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = weight
    layer.bias = bias
    return layer


def _batch_norm_layer(params: dict[str, Any], node: fx.Node, container: nn.Module | None) -> nn.Module:
    rank = node.args[0].meta["val"].dim()
    layer_type = nn.BatchNorm1d if rank <= 3 else {4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    mean, var, weight = params["running_mean"], params["running_var"], params["weight"]
    channels = next(t for t in (mean, weight) if t is not None).shape[0]
    momentum = node.args[6] if len(node.args) > 6 else 0.1
    layer = layer_type(channels, eps=float(params["eps"]), momentum=momentum, affine=weight is not None,
                       track_running_stats=mean is not None, device="meta")
    if weight is not None:
        layer.weight, layer.bias = weight, params["bias"]
    if mean is not None:
        layer.running_mean, layer.running_var = mean, var
        counter = getattr(container, "num_batches_tracked", None)
        layer.num_batches_tracked = counter if counter is not None else torch.tensor(0, device=mean.device)
    layer.train(bool(params["training"]) and mean is not None)
    return layer


_LAYERS = {"conv": _conv_layer, "linear": _linear_layer}


def _layer_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return str(next(reversed(stack.values()))[0]) if stack else ""


def _install_layer(graph_module: fx.GraphModule, path: str, layer: nn.Module, fallback_name: str) -> str:
    """Put ``layer`` at ``path`` when that is the plain container of the same tensors (or the same layer,
    lifted at an earlier call); else under ``fallback_name``."""
    tensors = {id(t) for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]}
    existing = _container(graph_module, path)
    if existing is not None and not list(existing.children()):
        own = [*existing.parameters(recurse=False), *existing.buffers(recurse=False)]
        if own and all(id(t) in tensors for t in own):
            if type(existing) is type(layer):
                return path  # the same layer called again
            prefix, _, name = path.rpartition(".")
            setattr(graph_module.get_submodule(prefix), name, layer)
            return path
    name, k = fallback_name, 1
    while hasattr(graph_module, name):
        name, k = f"{fallback_name}_{k}", k + 1
    graph_module.add_submodule(name, layer)
    return name


def _lift_layers(graph_module: fx.GraphModule) -> None:
    graph = graph_module.graph
    counters: set[str] = set()  # num_batches_tracked of the BatchNorms made modules
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        spelling = spelling_of(node, graph_module)
        key = spelling.key if spelling else None
        if key not in ("conv", "linear", "batch_norm"):
            continue
        try:
            args = [node.args[0], *(attribute_value(graph_module, a) for a in node.args[1:])]
            kwargs = {k: attribute_value(graph_module, v) for k, v in node.kwargs.items()}
            _, params = spelling.canonicalize(*args, **kwargs)
        except (LookupError, NotImplementedError, TypeError):
            continue  # weights computed in the graph, or a form without a layer: stays a functional call
        weight = params.get("weight")
        if weight is not None and not isinstance(weight, nn.Parameter):
            continue
        path = _layer_path(node)
        if key == "batch_norm":
            container = _container(graph_module, path)
            layer = _batch_norm_layer(params, node, container)
        else:
            if weight is None:
                continue
            layer = _LAYERS[key](params)
        target = _install_layer(graph_module, path, layer, f"{node.name}_layer")
        with graph.inserting_before(node):
            call = graph.call_module(target, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        if key == "batch_norm":
            counters.add(f"{target}.num_batches_tracked")
    _drop_batch_counters(graph, counters)


def _container(graph_module: fx.GraphModule, path: str) -> nn.Module | None:
    try:
        return graph_module.get_submodule(path) if path else None
    except AttributeError:
        return None


def _drop_batch_counters(graph: fx.Graph, counters: set[str]) -> None:
    """Remove ``counter.add_(1)`` for each of ``counters``: a BatchNorm module counts its own batches."""
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target == aten.add_.Tensor and not node.users
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
                and node.args[0].target in counters):
            graph.erase_node(node)


# -- plain calling convention -----------------------------------------------------------------------------------
def _plain_codegen(graph_module: fx.GraphModule) -> None:
    """Plain positional inputs and outputs instead of the pytree convention, when the program takes tensors as
    positional arguments and returns a tensor or a tuple of tensors."""
    codegen = graph_module.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None:
        return
    in_spec, out_spec = info.in_spec, info.out_spec
    if in_spec is None or in_spec.num_children != 2:
        return
    args_spec, kwargs_spec = in_spec.children()
    if kwargs_spec.num_leaves != 0 or any(not child.is_leaf() for child in args_spec.children()):
        return
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    flat = output.args[0]
    result = pytree.tree_unflatten(list(flat), out_spec) if out_spec is not None else flat
    if not (isinstance(result, fx.Node) or (isinstance(result, tuple) and all(isinstance(r, fx.Node) for r in result))):
        return
    graph_module.graph._codegen = fx.graph.CodeGen()
    output.args = (result,)


def as_module(model: Any) -> Any:
    """An ExportedProgram as the GraphModule graphnorm converts (:func:`graph_module_from_export`); anything
    else as it is."""
    return graph_module_from_export(model) if is_exported_program(model) else model


def graph_module_from_export(program: torch.export.ExportedProgram, capture: str = EXPORT_CAPTURE) -> fx.GraphModule:
    """The program as a GraphModule with layers as modules (see the module docstring), in training mode when
    the program's BatchNorms compute batch statistics. The program is not modified; the GraphModule shares its
    parameters. ``meta["graphnorm.capture"]`` is ``capture``, with the batch size where the program fixed it."""
    from .trace import CAPTURE, INPUT_NAMES, SPECIALIZED

    graph_module = program.module(check_guards=False)
    graph_module._forward_pre_hooks.clear()  # the input checks: graphnorm checks the input shape itself
    for name in ("train", "eval"):  # module() refuses mode changes; the layers made modules again follow them
        graph_module.__dict__.pop(name, None)
    graph = graph_module.graph
    _use_one_output_forms(graph)
    _lift_layers(graph_module)
    _plain_codegen(graph_module)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    batch_norms = [m for m in graph_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    graph_module.training = any(m.training for m in batch_norms)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not batch_is_dynamic(graph_module):
        capture += f" (batch size fixed to {placeholders[0].meta['val'].shape[0]} by the model)"
    graph_module.meta[CAPTURE] = capture
    graph_module.meta[SPECIALIZED] = []
    graph_module.meta[INPUT_NAMES] = [str(n.target) for n in placeholders]
    return graph_module
