"""Moment propagation: run a traced graph on :class:`~graphnorm.Moments` instead of tensors.

:class:`MomentPropagator` prepares a model once (trace, shape inference, rule look-up, the list of every op
without a rule); :meth:`MomentPropagator.run` is the propagation pass itself, an ``fx.Interpreter`` whose
activation values are Moments (in the style of torch.fx's ``ShapeProp``). Nodes that carry no activation
(weights, shapes, constants) are computed as usual; ``x.size()``/``x.shape`` of an activation answer with the
shape of the batch ``input_shape`` describes.

The pass is made of torch operations on the model's parameters, so it is differentiable with respect to them,
and in per-channel mode it costs O(number of weights), whatever the batch or image size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import fx

from .errors import GraphnormError, RuleError, UnsupportedOp, UnsupportedOpError, first_line
from .graphs import ancestors, parameter_dtype
from .moments import Moments
from .ops import canonical_call, target_name
from .program import RuleRecord, recording_of
from .rules import RULES
from .sampling import DEFAULT_SAMPLES, CommonRandomNumbers, SampledFallback, SampledNode, resolve_fallback, sampled_call
from .stats import InputStats
from .trace import INPUT_NAMES, OP_KEY, trace

__all__ = ["AUTO_SPATIAL_MAX_SIDE", "MomentPropagator", "MomentTable", "NodeInfo", "auto_spatial", "propagate"]

BatchNormStats = Literal["auto", "running", "analytic"]
Accuracy = Literal["fast", "accurate"]
ACCURACIES = ("fast", "accurate")

_STATIC_METHODS = frozenset({"size", "dim", "ndimension"})
_STATIC_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


@dataclass(frozen=True)
class NodeInfo:
    """What a table row describes: the node's op key, the module path it belongs to, its output shape."""

    op: str | None
    module_path: str | None
    shape: tuple[int, ...]


class MomentTable(Mapping[str, Moments]):
    """Moments of every activation, keyed by node name, in graph order."""

    def __init__(self, moments: dict[str, Moments], info: dict[str, NodeInfo]):
        self._moments = moments
        self.info = info

    def __getitem__(self, name: str) -> Moments:
        return self._moments[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._moments)

    def __len__(self) -> int:
        return len(self._moments)

    def __repr__(self) -> str:
        header = f"{'node':<28} {'op':<18} {'shape':<18} {'mean^2':>10} {'var':>10} {'std min':>9} {'std max':>9}"
        lines = [f"MomentTable({len(self)} activations; channel averages)", header]
        with torch.no_grad():
            for name, moments in self._moments.items():
                std = moments.std
                lines.append(
                    f"{name[:28]:<28} {str(self.info[name].op)[:18]:<18} {str(moments.shape)[:18]:<18} "
                    f"{moments.mean.square().mean().item():>10.4g} {moments.var.mean().item():>10.4g} "
                    f"{std.min().item():>9.4g} {std.max().item():>9.4g}"
                )
        return "\n".join(lines)


def _module_path(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(next(reversed(stack.values()))[0])
    return None


_SYM_SIZE = torch.ops.aten.sym_size.int  # x.size(dim) in a graph captured by torch.export


def _is_static_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _STATIC_METHODS:
        return True
    if node.op == "call_function" and node.target == _SYM_SIZE:
        return True
    return (node.op == "call_function" and node.target is getattr and len(node.args) > 1
            and node.args[1] in _STATIC_ATTRIBUTES)


class MomentPropagator:
    """A model prepared for repeated moment propagation.

    Args:
        model: an ``nn.Module`` (traced with :func:`graphnorm.trace`), a GraphModule from it, or a
            ``torch.export.ExportedProgram``.
        input_shape: shape of one input batch, batch dim first, e.g. ``(1, 3, 32, 32)``.
        spatial: keep per-unit maps (exact zero padding at borders) instead of per-channel moments.
        batch_norm: "auto" uses each BatchNorm as its mode says (running statistics in eval, the analytic
            statistics of its own input in training or without running statistics); "running" and "analytic"
            force one form for all.
        dtype: the dtype of the moments (default: that of the model's parameters).
        targets: node names whose moments are wanted; the pass then runs only what they depend on (the
            default runs every node).
        fallback: "sample" (default) computes the moments of an op without a closed-form rule from
            ``fallback_samples`` Gaussian samples (:mod:`graphnorm.sampling`); "error" raises
            :class:`~graphnorm.UnsupportedOpError` listing every such op instead. The sampled nodes are listed
            in ``sampled`` (complete after the first :meth:`run`: a rule may decline a call it cannot handle).
        accuracy: "fast" (default) assumes every activation's input is Gaussian and all units independent;
            "accurate" also carries the third cumulant (every activation corrected for its input's skewness,
            :mod:`graphnorm.rules.skewness`), the correlation between neighbouring positions of a channel
            (:mod:`graphnorm.rules.neighbours`) and between the channels of a position through convolutions
            and pooling (:mod:`graphnorm.rules.channel_correlation`); measured gain and cost in
            docs/math.md section 6.
    """

    def __init__(self, model: nn.Module | torch.export.ExportedProgram, input_shape: Iterable[int], *,
                 spatial: bool = False,
                 batch_norm: BatchNormStats = "auto", leaf_modules: Iterable[type | str] = (),
                 concrete_args: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
                 targets: Iterable[str] | None = None, fallback: str | SampledFallback | None = "sample",
                 fallback_samples: int = DEFAULT_SAMPLES, accuracy: Accuracy = "fast"):
        if accuracy not in ACCURACIES:
            raise GraphnormError(f"accuracy must be 'fast' or 'accurate', got {accuracy!r}")
        self.accuracy = accuracy
        self.input_shape = tuple(int(size) for size in input_shape)
        if len(self.input_shape) < 2 or any(size < 1 for size in self.input_shape):
            raise GraphnormError(
                f"input_shape {self.input_shape} must be (batch, channels, ...) with positive sizes, "
                "e.g. (1, 3, 32, 32)")
        if batch_norm not in ("auto", "running", "analytic"):
            raise GraphnormError(f"batch_norm must be 'auto', 'running' or 'analytic', got {batch_norm!r}")
        self.spatial = spatial
        self.batch_norm = batch_norm
        self.fallback = resolve_fallback(fallback, fallback_samples)
        self.sampled: dict[str, SampledNode] = {}
        self.recorded: dict[str, RuleRecord] = {}  # what each rule put into a statistics program being recorded
        self._random_numbers = CommonRandomNumbers(self.fallback) if self.fallback is not None else None
        self.graph_module = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args,
                                  input_shape=self.input_shape)
        self._dtype = dtype
        self.extra_inputs = extra_inputs(self.graph_module, concrete_args or {})
        self.shapes = infer_shapes(self.graph_module, self.input_shape, self.dtype, self.extra_inputs)
        self.random_nodes = self._find_random_nodes()
        self.needed = None if targets is None else self._ancestors(set(targets))
        self._check_rules()
        self.info = {
            node.name: NodeInfo(node.meta.get(OP_KEY), _module_path(node), self.shapes.get(node.name, ()))
            for node in self.graph_module.graph.nodes if node.name in self.random_nodes or node.op == "output"
        }

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the moments: as given, else that of the model's parameters now."""
        if self._dtype is not None:
            return self._dtype
        return parameter_dtype(self.graph_module)

    def _find_random_nodes(self) -> set[str]:
        placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            raise GraphnormError("the traced model has no input")
        random = {placeholders[0].name}
        for node in self.graph_module.graph.nodes:
            is_call = node.op in ("call_module", "call_function", "call_method")
            if is_call and not _is_static_query(node) and any(arg.name in random for arg in node.all_input_nodes):
                random.add(node.name)
        return random

    def _ancestors(self, targets: set[str]) -> set[str]:
        """The nodes a pass must run to reach ``targets`` (the targets included)."""
        unknown = sorted(targets - {node.name for node in self.graph_module.graph.nodes})
        if unknown:
            raise GraphnormError(f"targets {unknown} are not nodes of the traced graph")
        return ancestors(self.graph_module.graph, targets)

    def _check_rules(self) -> None:
        missing = []
        for node in self.graph_module.graph.nodes:
            if node.name in self.random_nodes and node.op != "placeholder":
                key = node.meta.get(OP_KEY)
                if key is None or key not in RULES:
                    missing.append(UnsupportedOp(node.name, key or "unregistered",
                                                 target_name(node, self.graph_module), _module_path(node)))
        if missing and self.fallback is None:
            raise UnsupportedOpError(missing)
        for op in missing:
            self.sampled[op.node] = SampledNode(op.node, op.target, op.module_path, "no moment rule")

    def sample(self, node: fx.Node, call, args: tuple, kwargs: dict) -> Any:
        """The sampled fallback at ``node``: ``call(args, kwargs)`` runs its op on concrete tensors."""
        assert self._random_numbers is not None
        return sampled_call(call, args, kwargs, self._random_numbers, node.name, self.input_shape[0])

    def run(self, stats: InputStats) -> MomentTable:
        """One propagation pass from ``stats`` through the current parameters."""
        stats.validate_for(self.input_shape)
        if not stats.is_per_position and stats.correlation is None:
            return self.run_moments(stats.mean.to(self.dtype), stats.var.to(self.dtype))
        if stats.is_per_position:
            inputs = Moments.per_unit(stats.mean_map.to(self.dtype), stats.var_map.to(self.dtype))
        else:
            inputs = self._input_moments(stats.mean.to(self.dtype), stats.var.to(self.dtype))
        correlation = stats.correlation.to(self.dtype) if stats.correlation is not None else None
        return self._run(Moments(inputs.loc, inputs.spread, inputs.shape, correlation=correlation))

    def run_moments(self, mean: torch.Tensor, var: torch.Tensor) -> MomentTable:
        """One pass from per-channel input ``mean``/``var`` tensors (not validated; this is the form recorded
        into a statistics program, :mod:`graphnorm.program`)."""
        return self._run(self._input_moments(mean, var))

    def _input_moments(self, mean: torch.Tensor, var: torch.Tensor) -> Moments:
        inputs = Moments.per_channel(mean, var, self.input_shape[1:])
        if self.spatial and len(self.input_shape) > 2:
            inputs = Moments.per_unit(inputs.unit_mean, inputs.unit_var)
        return inputs

    def _run(self, inputs: Moments) -> MomentTable:
        if self.accuracy == "accurate" and inputs.third is None:
            inputs = inputs.with_third(torch.zeros_like(inputs.loc))  # the input is taken as Gaussian
        interpreter = _MomentInterpreter(self)
        interpreter.run(inputs, *self.extra_inputs)
        return MomentTable(interpreter.moments, self.info)


# Per-unit propagation is chosen when the input's smallest spatial side is at most this (see auto_spatial).
AUTO_SPATIAL_MAX_SIDE = 128


def auto_spatial(input_shape: tuple[int, ...], stats: InputStats) -> bool:
    """Whether propagation should keep per-unit maps: for per-position input statistics, and for inputs whose
    smallest spatial side is at most ``AUTO_SPATIAL_MAX_SIDE`` (a network that downsamples 32x then ends on
    maps of 4x4 or less, where zero padding touches most positions and per-channel moments are far off:
    docs/math.md, "Accuracy"). Feature vectors have no positions."""
    if len(input_shape) <= 2:
        return False
    return stats.is_per_position or min(input_shape[2:]) <= AUTO_SPATIAL_MAX_SIDE


def propagate(model: nn.Module | torch.export.ExportedProgram, stats: InputStats, input_shape: Iterable[int], *,
              spatial: bool = False,
              batch_norm: BatchNormStats = "auto", leaf_modules: Iterable[type | str] = (),
              concrete_args: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
              fallback: str | SampledFallback | None = "sample", fallback_samples: int = DEFAULT_SAMPLES,
              accuracy: Accuracy = "fast") -> MomentTable:
    """Per-channel (or per-unit, ``spatial=True``) mean and variance of every activation of ``model`` when its
    input has the per-channel statistics ``stats``. See :class:`MomentPropagator` for the arguments."""
    stats.validate_for(tuple(input_shape))
    propagator = MomentPropagator(model, input_shape, spatial=spatial, batch_norm=batch_norm,
                                  leaf_modules=leaf_modules, concrete_args=concrete_args, dtype=dtype,
                                  fallback=fallback, fallback_samples=fallback_samples, accuracy=accuracy)
    return propagator.run(stats)


def extra_inputs(graph_module: fx.GraphModule, concrete_args: dict[str, Any]) -> list[Any]:
    """Values of the placeholders after the first: from concrete_args, else their defaults."""
    values = []
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    names = graph_module.meta.get(INPUT_NAMES) or [str(n.target) for n in placeholders]
    for node, name in zip(placeholders[1:], names[1:], strict=False):
        if name in concrete_args:
            values.append(concrete_args[name])
        elif node.args:
            values.append(node.args[0])
        else:
            raise GraphnormError(f"the model's input '{name}' has no default; give its value in concrete_args")
    return values


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph on fake tensors (no compute, no mutation of the real module) and records shapes."""

    def __init__(self, graph_module: fx.GraphModule, fake_module: nn.Module):
        super().__init__(fake_module, garbage_collect_values=True, graph=graph_module.graph)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.failed_node: fx.Node | None = None

    def run_node(self, node: fx.Node) -> Any:
        try:
            value = super().run_node(node)
        except Exception:
            self.failed_node = node
            raise
        if isinstance(value, torch.Tensor):
            self.shapes[node.name] = tuple(int(size) for size in value.shape[1:])
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            self.shapes[node.name] = tuple(tuple(int(size) for size in v.shape[1:]) for v in value)
        return value


def infer_shapes(graph_module: fx.GraphModule, input_shape: tuple[int, ...], dtype: torch.dtype,
                  extra_inputs: list[Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every tensor-valued node, by running the graph on fake tensors (no compute,
    the model untouched). The batch is at least 2 so training-mode BatchNorm accepts it."""
    from torch._dynamo.utils import deepcopy_to_fake_tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = _ShapeRecorder(graph_module, deepcopy_to_fake_tensor(graph_module, fake_mode))
    try:
        with torch.no_grad(), fake_mode:
            sample = torch.empty((max(2, input_shape[0]), *input_shape[1:]), dtype=dtype)
            recorder.run(sample, *extra_inputs)
    except Exception as err:
        where = f" at node '{recorder.failed_node.name}'" if recorder.failed_node is not None else ""
        raise GraphnormError(
            f"the model does not run on an input of shape {input_shape}{where}: {first_line(err)}; "
            "check input_shape (batch, channels, ...)") from err
    return recorder.shapes


class _MomentInterpreter(fx.Interpreter):
    def __init__(self, propagator: MomentPropagator):
        super().__init__(propagator.graph_module, garbage_collect_values=False)
        self.propagator = propagator
        self.moments: dict[str, Moments] = {}
        self.orders: dict[str, tuple[int, ...]] = {}  # sample dims as a permutation of the input's (if moved)
        self.base_channels: dict[str, int | None] = {}  # channel count of the last channel-first activation

    def _batch_shape(self, moments: Moments) -> torch.Size:
        return torch.Size((self.propagator.input_shape[0], *moments.shape))

    def call_method(self, target, args, kwargs):
        if isinstance(args[0], Moments) and target in _STATIC_METHODS:
            shape = self._batch_shape(args[0])
            if target == "size":
                return shape if not args[1:] and "dim" not in kwargs else shape[args[1] if args[1:] else kwargs["dim"]]
            return len(shape)
        return super().call_method(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target == _SYM_SIZE and isinstance(args[0], Moments):
            return self._batch_shape(args[0])[args[1]]
        if target is getattr and isinstance(args[0], Moments):
            shape = self._batch_shape(args[0])
            return {"shape": shape, "ndim": len(shape), "dtype": self.propagator.dtype,
                    "device": args[0].loc.device}[args[1]]
        return super().call_function(target, args, kwargs)

    def run_node(self, node: fx.Node) -> Any:
        propagator = self.propagator
        if propagator.needed is not None and node.name not in propagator.needed and node.op != "placeholder":
            return None
        if node.name not in propagator.random_nodes or node.op == "placeholder":
            value = super().run_node(node)
            if isinstance(value, Moments):
                self.moments[node.name] = value
                self.base_channels[node.name] = value.shape[0]
            if node.op == "output" and isinstance(value, Moments):
                self.moments[node.name] = value
            return value
        with self._set_current_node(node):
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            if node.name in propagator.sampled:
                result = self._sample(node, args, kwargs)
            else:
                result = self._apply_rule(node, args, kwargs)
        summarize = not propagator.spatial and self._channel_first(node, result)
        if propagator.accuracy == "accurate" and isinstance(result, Moments) and result.third is None:
            result = result.with_third(torch.zeros_like(result.loc))  # an op without a third-cumulant rule
        if isinstance(result, Moments):
            if summarize:
                result = result.to_channels()
            self.moments[node.name] = result
        elif isinstance(result, (tuple, list)) and summarize:
            result = type(result)(r.to_channels() if isinstance(r, Moments) else r for r in result)
        return result

    def _channel_first(self, node: fx.Node, result: Any) -> bool:
        """Whether dim 0 of the node's sample is a channel dim (so channel moments mean something).

        Layouts that move the channels are tracked: a permutation (``x.permute(0, 2, 3, 1)`` before a
        LayerNorm over channels) records where the input's dims went, and a reshape whose leading dim is not
        the channel count of the last channel-first activation (a channel shuffle's ``[g, C/g, H, W]``, an
        attention's ``[heads, d, N]``) marks its output as not channel-first. Ops of the same rank after them
        inherit the layout and keep unit maps, until a permutation or reshape restores channels first."""
        sources = [source.name for source in node.all_input_nodes if source.name in self.base_channels]
        base = self.base_channels[sources[0]] if sources else None
        rank = len(result.shape) if isinstance(result, Moments) else None
        if node.name not in self.orders and rank is not None:
            if node.meta.get(OP_KEY) in ("reshape", "flatten"):
                if rank > 1 and base is not None and result.shape[0] != base:
                    self.orders[node.name] = (-1, *range(1, rank))
            else:
                for source in node.all_input_nodes:
                    order = self.orders.get(source.name)
                    if order is not None and len(order) == rank:
                        self.orders[node.name] = order
                        break
        order = self.orders.get(node.name)
        first = order is None or order[0] == 0
        self.base_channels[node.name] = result.shape[0] if first and rank else base
        return first

    def _apply_rule(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        propagator = self.propagator
        try:
            key, inputs, params = canonical_call(node, self.module, args, kwargs)
            if key == "batch_norm" and propagator.batch_norm != "auto":
                params["training"] = propagator.batch_norm == "analytic"
            if key == "permute":
                source = self.orders.get(node.args[0].name) or tuple(range(len(params["dims"])))
                self.orders[node.name] = tuple(source[d] for d in params["dims"])
            with recording_of(node.name, key, propagator.recorded):
                return RULES[key](*inputs, out_shape=propagator.shapes.get(node.name, ()), **params)
        except (RuleError, NotImplementedError) as err:
            if propagator.fallback is None:
                raise self._rule_failure(node, err) from err
            propagator.sampled[node.name] = SampledNode(node.name, target_name(node, self.module),
                                                        _module_path(node), f"rule declined: {first_line(err)}")
            return self._sample(node, args, kwargs)
        except (TypeError, ValueError) as err:
            raise self._rule_failure(node, err) from err

    def _rule_failure(self, node: fx.Node, err: Exception) -> RuleError:
        return RuleError(f"moment rule '{node.meta.get(OP_KEY)}' failed at node '{node.name}' "
                         f"({target_name(node, self.module)}): {err}")

    def _sample(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        def call(call_args: tuple, call_kwargs: dict) -> Any:
            return getattr(self, node.op)(node.target, call_args, call_kwargs)

        try:
            return self.propagator.sample(node, call, args, kwargs)
        except RuleError:
            raise
        except Exception as err:
            raise RuleError(f"the sampled fallback failed at node '{node.name}' ({target_name(node, self.module)}): "
                            f"{first_line(err)}") from err

