"""Freeze a model for deployment: every normalization becomes constants folded into the layer before it.

Starting from a converted model (or a plain model in eval mode), on a copy:

1. parametrizations (weight reparameterization) are materialized into plain weights;
2. NormProp layers become plain Linear/Conv layers with their effective weight and bias;
3. BatchNorm-like noise (identity in eval) is removed;
4. every analytic normalizer and every BatchNorm (module or functional, eval form) becomes the per-channel
   affine ``x * scale + shift`` it computes in eval, with ``scale = gamma/sqrt(var + eps)`` and
   ``shift = beta - mean * scale``;
5. each affine that directly follows a Linear/Conv (called once, no other user of its output, channels on dim
   1) is folded into it: ``W' = scale W``, ``b' = scale b + shift``; the others stay a
   :class:`~graphnorm.normalizers.ChannelAffine` (a Mul and an Add in ONNX).

The result holds plain Conv/Linear ops and no BatchNorm; :func:`graphnorm.export_onnx` checks that its
outputs equal the original's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from torch import fx

from .converted import ConvertedModule, remove_statistics_program
from .errors import GraphnormError
from .graphs import parameter_dtype
from .normalizers import AnalyticNorm, BatchNoise, ChannelAffine, NormPropLayer
from .propagate import extra_inputs, infer_shapes
from .rewrite import ConversionLog, call_counts, find_sites, foldable_producer
from .rules.affine import batch_norm_affine
from .trace import tag_op_keys, trace

__all__ = ["freeze"]


def _plain_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new, unparametrized Linear/Conv like ``layer`` with the given weight and bias.

    (``parametrize.remove_parametrizations`` on a deep copy would delete the property from the class that the
    copy shares with the original, breaking the original.)"""
    cls = parametrize.type_before_parametrizations(layer)
    if issubclass(cls, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features)
    elif issubclass(cls, nn.modules.conv._ConvNd) and not layer.transposed:
        plain = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation, layer.groups, True, layer.padding_mode)
    else:
        raise GraphnormError(f"cannot freeze a {cls.__name__}: only Linear and Conv layers are folded")
    plain = plain.to(dtype=weight.dtype, device=weight.device)
    plain.weight = nn.Parameter(weight.detach().clone())
    plain.bias = nn.Parameter((bias if bias is not None else torch.zeros_like(weight[:, 0].flatten(1)[:, 0]))
                              .detach().clone().reshape(-1))
    return plain


def _plain_layers(graph_module: fx.GraphModule) -> None:
    """Materialize weight reparameterizations and NormProp layers into plain Linear/Conv modules."""
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        module = graph_module.get_submodule(node.target)
        if isinstance(module, NormPropLayer):
            plain = _plain_layer(module.layer, *module.effective_weight_and_bias())
            graph_module.add_submodule(str(node.target), plain)
        elif parametrize.is_parametrized(module):
            graph_module.add_submodule(str(node.target), _plain_layer(module, module.weight, module.bias))


def _affine_of(weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = batch_norm_affine(mean, var, eps, weight, bias)
    return scale.detach(), shift.detach()


class _Freezer:
    def __init__(self, graph_module: fx.GraphModule, input_shape: tuple[int, ...],
                 concrete_args: dict[str, Any] | None):
        self.gm = graph_module
        self.graph = graph_module.graph
        # Freezing needs shapes, not moments: a model with ops that have no moment rule still freezes.
        self.shapes = infer_shapes(graph_module, input_shape, parameter_dtype(graph_module),
                                   extra_inputs(graph_module, concrete_args or {}))
        self.counts = call_counts(graph_module)
        self.added = 0

    def affine_sites(self) -> list[tuple[fx.Node, torch.Tensor, torch.Tensor]]:
        """Every normalization node with the per-channel affine it computes in eval."""
        sites = []
        for node in self.graph.nodes:
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), AnalyticNorm):
                norm = self.gm.get_submodule(node.target)
                if norm.statistics is None:
                    raise GraphnormError(f"normalizer '{node.target}' has no statistics; run the model once first")
                sites.append((node, *(t.detach() for t in norm.eval_affine())))
        random = set(self.shapes)
        for site in find_sites(self.gm, random, ConversionLog("freeze")):
            if site.running_mean is None or site.running_var is None:
                path = site.module_path or site.node.name
                raise GraphnormError(f"BatchNorm '{path}' has no running statistics, so its eval output depends on "
                                     "the batch; convert the model with graphnorm.convert first")
            sites.append((site.node, *_affine_of(site.weight, site.bias, site.running_mean, site.running_var,
                                                 site.eps)))
        return sites

    def replace_affine(self, node: fx.Node, scale: torch.Tensor, shift: torch.Tensor) -> str:
        producer, _ = foldable_producer(self.gm, node, self.shapes, self.counts)
        source = node.args[0]
        if producer is not None:
            layer = self.gm.get_submodule(producer.target)
            with torch.no_grad():
                weight = layer.weight * scale.to(layer.weight).reshape((-1,) + (1,) * (layer.weight.dim() - 1))
                bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
                layer.weight = nn.Parameter(weight)
                layer.bias = nn.Parameter(bias * scale.to(bias) + shift.to(bias))
            node.replace_all_uses_with(producer)
            self.graph.erase_node(node)
            return "folded"
        name = f"graphnorm_affine_{self.added}"
        self.added += 1
        self.gm.add_submodule(name, ChannelAffine(scale, shift))
        with self.graph.inserting_after(node):
            affine = self.graph.call_module(name, (source,))
        node.replace_all_uses_with(affine)
        self.graph.erase_node(node)
        return "affine"


def freeze(model: nn.Module, *, input_shape: Iterable[int], leaf_modules: Iterable[type | str] = (),
           concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """An eval-mode copy of ``model`` whose normalizations are constants folded into its Linear/Conv layers
    (see the module docstring). ``model`` is not modified."""
    input_shape = tuple(int(s) for s in input_shape)
    if isinstance(model, ConvertedModule):
        model.eval()
        model.refresh_statistics(force=True)
    frozen = copy.deepcopy(model).eval()
    if isinstance(frozen, fx.GraphModule):
        remove_statistics_program(frozen)  # the statistics are constants now: those of the refresh above
        frozen = fx.GraphModule(frozen, frozen.graph)
    else:
        frozen = trace(frozen, leaf_modules=leaf_modules, concrete_args=concrete_args)
    with torch.no_grad():
        _plain_layers(frozen)
    for node in list(frozen.graph.nodes):
        if node.op == "call_module" and isinstance(frozen.get_submodule(node.target), BatchNoise):
            node.replace_all_uses_with(node.args[0])
            frozen.graph.erase_node(node)
    tag_op_keys(frozen)
    freezer = _Freezer(frozen, input_shape, concrete_args)
    for node, scale, shift in freezer.affine_sites():
        freezer.replace_affine(node, scale, shift)
    frozen.graph.eliminate_dead_code()
    frozen.graph.lint()
    frozen.recompile()
    frozen.delete_all_unused_submodules()
    tag_op_keys(frozen)
    return frozen
