"""The module :func:`graphnorm.convert` returns: a GraphModule whose forward computes its normalizers'
statistics from its parameters, then runs the network.

The statistics are moment propagation over the model's own graph (the analytic normalizer's rule restarts
downstream propagation from ``(beta, gamma^2)``, so one pass gives every normalizer the moments of its input).
Conversion runs that pass once as an ``fx.Interpreter`` over Moments to record it as straight-line code
(:mod:`graphnorm.program`): a :class:`~graphnorm.program.StatisticsProgram` submodule
``graphnorm_statistics`` that the graph calls first, with the parameters it needs; each analytic normalizer
and each folded layer is then called with its statistics. In training the program runs at every forward with
autograd, so gradients reach the upstream weights through the statistics; in eval its results are cached
until a parameter or buffer changes.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .graphs import parameter_dtype
from .program import (
    StatisticsProgram,
    StatisticsSummary,
    compute_dtype,
    folded_layer,
    record_statistics,
    training_flag_reads,
)
from .propagate import MomentPropagator
from .rules.normalizers import raw_layer_output
from .sampling import SampledFallback
from .stats import InputStats

__all__ = ["ConvertedModule", "StatisticsState"]

PROGRAM = "graphnorm_statistics"


@dataclass(eq=False)
class StatisticsState:
    """What a converted model needs to (re)record its statistics pass."""

    stats: InputStats
    input_shape: tuple[int, ...]
    spatial: bool
    concrete_args: dict[str, Any] | None
    fallback: SampledFallback | None = None
    analytic_sites: list[tuple[str, str]] = field(default_factory=list)  # (normalizer module, its input node)
    reparam_sites: list[tuple[str, str]] = field(default_factory=list)  # (folded layer module, its input node)
    propagator: MomentPropagator | None = None

    def fresh_copy(self) -> StatisticsState:
        """Same configuration, no propagator (for a copied model)."""
        return StatisticsState(self.stats, self.input_shape, self.spatial, copy.copy(self.concrete_args),
                               self.fallback, list(self.analytic_sites), list(self.reparam_sites))

    def __getstate__(self) -> dict:
        """A pickled model carries the configuration, not the prepared propagator."""
        state = dict(self.__dict__)
        state["propagator"] = None
        return state

    @property
    def has_sites(self) -> bool:
        return bool(self.analytic_sites or self.reparam_sites)

    def interpret(self, model: fx.GraphModule, mean: torch.Tensor, var: torch.Tensor) -> list[torch.Tensor]:
        """The site statistics by interpreting the graph on Moments (before a program exists, and to record
        one): ``[mean, var]`` of every analytic normalizer's input, then of every folded layer's raw output."""
        table = self.prepare(model).run_moments(mean, var)
        outputs = []
        for _, input_name in self.analytic_sites:
            outputs += [table[input_name].mean, table[input_name].var]
        for module_name, input_name in self.reparam_sites:
            layer = model.get_submodule(module_name)
            state = layer.parametrizations.weight[0].state
            raw = raw_layer_output(layer, table[input_name], state.out_shape)
            outputs += [raw.mean, raw.var]
        return outputs

    def prepare(self, model: fx.GraphModule) -> MomentPropagator:
        """The propagator over ``model``'s graph (prepared once: shape inference, rule look-up)."""
        if self.propagator is None:
            targets = [name for _, name in self.analytic_sites + self.reparam_sites]
            self.propagator = MomentPropagator(model, self.input_shape, spatial=self.spatial,
                                               concrete_args=self.concrete_args, targets=targets,
                                               fallback=self.fallback)
        return self.propagator

    def distribute(self, model: fx.GraphModule, outputs: list[torch.Tensor]) -> None:
        """Hand site statistics (as :meth:`interpret` orders them) to the normalizers and folded layers, for
        use outside the graph (``module.statistics``, a parametrized ``layer.weight``, freezing)."""
        pairs = iter(zip(outputs[0::2], outputs[1::2], strict=True))
        for module_name, _ in self.analytic_sites:
            model.get_submodule(module_name).statistics = next(pairs)
        for module_name, _ in self.reparam_sites:
            model.get_submodule(module_name).parametrizations.weight[0].state.update(*next(pairs))

    def input_tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stats.mean.to(dtype), self.stats.var.to(dtype)


class ConvertedModule(fx.GraphModule):
    """A GraphModule that computes its normalizers' statistics from its parameters before the network.

    ``graphnorm_log`` describes what the conversion did (see :class:`graphnorm.ConversionLog`).
    """

    graphnorm_log: Any

    @property
    def input_stats(self) -> InputStats:
        """The input statistics every normalizer's statistics are propagated from.

        Setting new ones adapts the model to a new input distribution without data: the analytic statistics
        follow the new input statistics, while each calibration (fitted at conversion under the old ones) keeps
        correcting what the independence assumption misses. A model converted with the input statistics its
        running statistics were measured under, then given the statistics of new inputs, re-normalizes for them
        (docs/convert.md, "Adapting to new inputs")."""
        return self._statistics_state().stats

    @input_stats.setter
    def input_stats(self, stats: InputStats) -> None:
        state = self._statistics_state()
        stats.validate_for(state.input_shape)
        state.stats = stats
        program = self.statistics_program
        if program is not None:
            with torch.no_grad():
                program.input_mean.copy_(stats.mean)
                program.input_var.copy_(stats.var)
            program.invalidate()

    @property
    def statistics_program(self) -> StatisticsProgram | None:
        """The recorded statistics pass (None for a model without analytic or folded normalizers)."""
        program = getattr(self, PROGRAM, None)
        return program if isinstance(program, StatisticsProgram) else None

    def statistics_inputs(self) -> list[torch.Tensor]:
        """The parameters and buffers the statistics program takes, in its order (what the graph passes it)."""
        program = self.statistics_program
        if program is None:
            return []
        named = dict(self.named_parameters()) | dict(self.named_buffers())
        return [named[name] for name in program.names]

    def _statistics_state(self) -> StatisticsState:
        state = self.__dict__.get("_graphnorm_state")
        if state is None:
            raise AttributeError("this ConvertedModule carries no statistics state (it was not made by convert)")
        return state

    def refresh_statistics(self, *, force: bool = False) -> None:
        """Compute the statistics now (with autograd in training) and store them on the normalizers
        (``AnalyticNorm.statistics``) and folded layers (their parametrized ``weight``/``bias``), where code
        outside the graph reads them. The model's own forward does not need this. ``force`` drops the eval
        cache first."""
        state = self.__dict__.get("_graphnorm_state")
        if state is None or not state.has_sites:
            return
        program = self.statistics_program
        if program is None:
            dtype = compute_dtype(parameter_dtype(self))
            with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
                outputs = state.interpret(self, *state.input_tensors(dtype))
        else:
            if force:
                program.invalidate()
            outputs = program(*self.statistics_inputs())
        state.distribute(self, list(outputs))

    def record_statistics_program(self) -> None:
        """Record the statistics pass (:mod:`graphnorm.program`) and make the graph call it: run once by
        :func:`graphnorm.convert`."""
        state = self._statistics_state()
        if not state.has_sites or self.statistics_program is not None:
            return
        dtype = compute_dtype(parameter_dtype(self))
        input_mean, input_var = state.input_tensors(dtype)
        unique = dict(self.named_parameters()) | dict(self.named_buffers())  # a shared tensor under one name

        def run(mean: torch.Tensor, var: torch.Tensor, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            with torch.nn.utils.stateless._reparametrize_module(self, values, tie_weights=True):
                return state.interpret(self, mean, var)

        state.prepare(self)  # before recording: preparation runs the graph on fake tensors
        was_training = self.training
        programs = {}
        try:
            self.train(True)
            with training_flag_reads() as reads:  # the recording's own pass tells whether the mode matters
                programs[True] = record_statistics(run, input_mean, input_var, unique)
            if reads & {id(module) for module in self.modules()}:  # (recording machinery reads its own)
                self.train(False)
                programs[False] = record_statistics(run, input_mean, input_var, unique)
        finally:
            self.train(was_training)
        names = _used_inputs(programs, list(unique))
        programs.setdefault(False, programs[True])  # no module's mode is read: one program for both
        program = StatisticsProgram(programs[True], programs[False], input_mean, input_var, names)
        self.add_submodule(PROGRAM, program)
        _call_program(self, state, names)
        log = getattr(self, "graphnorm_log", None)
        if log is not None:
            log.statistics = StatisticsSummary.of(programs[True], state.prepare(self).recorded)
        state.propagator = None

    def __reduce__(self) -> tuple:
        """Pickles (``torch.save(model)``, spawned workers) load back as a ConvertedModule."""
        _, (body, import_block) = super().__reduce__()
        body["_tracer_cls"] = _RestoreTracer  # graphnorm's tracer needs arguments; the generated code is plain torch
        return (_restore_converted, (body, import_block))

    def __deepcopy__(self, memo: dict[int, Any]) -> ConvertedModule:
        state = self.__dict__.pop("_graphnorm_state", None)
        try:
            result = super().__deepcopy__(memo)
        finally:
            if state is not None:
                self.__dict__["_graphnorm_state"] = state
        if state is not None:
            result.__dict__["_graphnorm_state"] = state.fresh_copy()
        result.graphnorm_log = copy.deepcopy(getattr(self, "graphnorm_log", None), memo)
        return result


class _RestoreTracer(fx.Tracer):
    """What re-traces a pickled converted model's code: folded layers stay calls (their body reads shapes)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(folded_layer,))


def _restore_converted(body: dict[str, Any], import_block: str) -> ConvertedModule:
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    forward = _forward_from_src(import_block + (body.get("_code") or body["code"]), {})
    return _deserialize_graph_module(forward, body, graph_module_cls=ConvertedModule)


def _used_inputs(programs: dict[bool, fx.GraphModule], names: list[str]) -> list[str]:
    """Drop the inputs (after the two input statistics) that neither program uses; returns the kept names."""
    placeholder_lists = {key: [n for n in program.graph.nodes if n.op == "placeholder"]
                         for key, program in programs.items()}
    used = [any(len(nodes[2 + i].users) > 0 for nodes in placeholder_lists.values()) for i in range(len(names))]
    for program, nodes in zip(programs.values(), placeholder_lists.values(), strict=True):
        for node, keep in zip(nodes[2:], used, strict=True):
            if not keep:
                program.graph.erase_node(node)
        program.graph.lint()
        program.recompile()  # the only code generation of a recorded program
    return [name for name, keep in zip(names, used, strict=True) if keep]


def _call_program(model: ConvertedModule, state: StatisticsState, names: list[str]) -> None:
    """Rewrite the graph: the program's call first, then every site called with its statistics."""
    graph = model.graph
    first = next(node for node in graph.nodes if node.op != "placeholder")
    with graph.inserting_before(first):
        inputs = [graph.get_attr(name) for name in names]
        call = graph.call_module(PROGRAM, tuple(inputs))
        statistics = [graph.call_function(operator.getitem, (call, index))
                      for index in range(2 * (len(state.analytic_sites) + len(state.reparam_sites)))]
    pairs = iter(zip(statistics[0::2], statistics[1::2], strict=True))
    nodes = {str(node.target): node for node in graph.nodes if node.op == "call_module"}  # one call per site
    for module_name, _ in state.analytic_sites:
        node = nodes[module_name]
        node.args = (node.args[0], *next(pairs))
    for module_name, _ in state.reparam_sites:
        mean, var = next(pairs)
        node = nodes[module_name]
        with graph.inserting_before(node):
            layer = graph.get_attr(module_name)
            folded = graph.call_function(folded_layer, (layer, node.args[0], mean, var))
        folded.meta.update(node.meta)
        node.replace_all_uses_with(folded)
        graph.erase_node(node)
    graph.lint()
    model.recompile()


def remove_statistics_program(model: fx.GraphModule) -> None:
    """Undo :func:`_call_program` on ``model`` (a copy, for freezing): sites called without statistics again
    (each uses the statistics stored by the last :meth:`ConvertedModule.refresh_statistics`), the program's
    call and submodule removed."""
    graph = model.graph
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == PROGRAM]
    if not calls:
        return
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is folded_layer:
            layer, x = node.args[0], node.args[1]
            with graph.inserting_before(node):
                plain = graph.call_module(str(layer.target), (x,))
            plain.meta.update(node.meta)
            node.replace_all_uses_with(plain)
            graph.erase_node(node)
        elif node.op == "call_module" and any(arg in calls[0].users for arg in node.args[1:]):
            node.args = node.args[:1]
    for getitem in list(calls[0].users):
        graph.erase_node(getitem)
    inputs = calls[0].all_input_nodes
    graph.erase_node(calls[0])
    for node in inputs:
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    model.recompile()
    model.delete_submodule(PROGRAM)
