"""The module :func:`graphnorm.convert` returns: a GraphModule that recomputes its normalizers' statistics.

Before every call, a converted model runs moment propagation over its own graph (the analytic normalizer's
rule restarts downstream propagation from ``(beta, gamma^2)``, so one pass gives every normalizer the moments
of its input) and hands the results to its normalizers and folded layers. In training the pass runs at every
forward, with autograd, so gradients reach the upstream weights through the statistics. In eval the results
are cached and recomputed only when a parameter or buffer changed (their version counters) or on an explicit
:meth:`ConvertedModule.refresh_statistics`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .propagate import MomentPropagator
from .rules.normalizers import raw_layer_output
from .sampling import SampledFallback
from .stats import InputStats

__all__ = ["ConvertedModule", "StatisticsState"]


@dataclass(eq=False)
class StatisticsState:
    """What a converted model needs to recompute its statistics."""

    stats: InputStats
    input_shape: tuple[int, ...]
    spatial: bool
    concrete_args: dict[str, Any] | None
    fallback: SampledFallback | None = None
    analytic_sites: list[tuple[str, str]] = field(default_factory=list)  # (normalizer module, its input node)
    reparam_sites: list[tuple[str, str]] = field(default_factory=list)  # (folded layer module, its input node)
    propagator: MomentPropagator | None = None
    cache_key: tuple | None = None

    def fresh_copy(self) -> StatisticsState:
        """Same configuration, no propagator or cache (for a copied model)."""
        return StatisticsState(self.stats, self.input_shape, self.spatial, copy.copy(self.concrete_args),
                               self.fallback, list(self.analytic_sites), list(self.reparam_sites))

    def _key(self, model: torch.nn.Module) -> tuple:
        tensors = [*model.parameters(), *model.buffers()]
        return (tuple((id(t), t._version, t.data_ptr(), t.dtype) for t in tensors),
                tuple(m.training for m in model.modules()))

    def refresh(self, model: fx.GraphModule, *, force: bool = False) -> None:
        if not (self.analytic_sites or self.reparam_sites):
            return
        training = model.training
        key = None if training else self._key(model)
        if not force and key is not None and key == self.cache_key:
            return
        if self.propagator is None:
            targets = [name for _, name in self.analytic_sites + self.reparam_sites]
            self.propagator = MomentPropagator(model, self.input_shape, spatial=self.spatial,
                                               concrete_args=self.concrete_args, targets=targets,
                                               fallback=self.fallback)
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            table = self.propagator.run(self.stats)
        for module_name, input_name in self.analytic_sites:
            moments = table[input_name]
            model.get_submodule(module_name).statistics = (moments.mean, moments.var)
        for module_name, input_name in self.reparam_sites:
            layer = model.get_submodule(module_name)
            state = layer.parametrizations.weight[0].state
            raw = raw_layer_output(layer, table[input_name], state.out_shape)
            state.update(raw.mean, raw.var)
        self.cache_key = None if training else self._key(model)


class ConvertedModule(fx.GraphModule):
    """A GraphModule whose normalizers get their analytic statistics before every call.

    ``graphnorm_log`` describes what the conversion did (see :class:`graphnorm.ConversionLog`).
    """

    graphnorm_log: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.refresh_statistics()
        return super().__call__(*args, **kwargs)

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
        state.cache_key = None

    def _statistics_state(self) -> StatisticsState:
        state = self.__dict__.get("_graphnorm_state")
        if state is None:
            raise AttributeError("this ConvertedModule carries no statistics state (it was not made by convert)")
        return state

    def refresh_statistics(self, *, force: bool = False) -> None:
        """Recompute the statistics now (in eval only when parameters changed, unless ``force``)."""
        state = self.__dict__.get("_graphnorm_state")
        if state is not None:
            state.refresh(self, force=force)

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
