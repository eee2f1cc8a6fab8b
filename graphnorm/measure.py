"""Empirical per-channel moments of every activation, measured by running the traced graph on data.

This is the reference the analytic moments are compared with (inspect reports, accuracy benchmarks). It runs
an ``fx.Interpreter`` over the traced graph (no hooks are left on the model), streams the batches, and merges
per-batch channel moments in float64 (Chan et al. parallel update), so memory is bounded by one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .graphs import ancestors
from .ops import canonical_call
from .stats import ChannelAccumulator

__all__ = ["ChannelAccumulator", "analytic_batchnorm_statistics", "measure"]


class _Recorder(fx.Interpreter):
    def __init__(self, graph_module: fx.GraphModule, nodes: set[str], accumulators: dict[str, ChannelAccumulator],
                 batchnorm_statistics: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(graph_module, garbage_collect_values=True)
        self.nodes = nodes
        self.needed = ancestors(graph_module.graph, nodes)
        self.accumulators = accumulators
        self.batchnorm_statistics = batchnorm_statistics

    def run_node(self, node: fx.Node) -> Any:
        if node.name not in self.needed and node.op not in ("placeholder", "output"):
            return None  # nothing measured depends on it
        if node.name in self.batchnorm_statistics:
            value = self._batch_norm_with(node, *self.batchnorm_statistics[node.name])
        else:
            value = super().run_node(node)
        if node.name in self.nodes and isinstance(value, torch.Tensor) and value.dim() >= 2:
            self.accumulators.setdefault(node.name, ChannelAccumulator()).add(value)
        return value


    def _batch_norm_with(self, node: fx.Node, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The BatchNorm at ``node`` in eval form with the given statistics instead of its own."""
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        _, inputs, params = canonical_call(node, self.module, args, kwargs)
        x = inputs[0]
        return F.batch_norm(x, mean.to(x), var.to(x), params["weight"], params["bias"], False, 0.0, params["eps"])


def analytic_batchnorm_statistics(graph_module: fx.GraphModule, table: Mapping[str, Any]
                                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{BatchNorm node: (mean, var) of its input}`` from a moment table, for ``batchnorm_statistics=`` of
    :func:`measure`: the network then normalizes each call site the way a converted model would."""
    return {node.name: (table[node.args[0].name].mean.detach(), table[node.args[0].name].var.detach())
            for node in graph_module.graph.nodes if node.meta.get("graphnorm.op") == "batch_norm"}


def measure(graph_module: fx.GraphModule, batches: Iterable[torch.Tensor], nodes: Iterable[str], *,
            batchnorm_statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
            ) -> dict[str, ChannelAccumulator]:
    """Per-channel moments of the outputs of ``nodes`` over all ``batches`` (run under ``torch.no_grad``).

    ``batchnorm_statistics`` maps BatchNorm node names to ``(mean, var)`` used instead of their own
    statistics (e.g. the analytic ones: how a converted model would normalize)."""
    accumulators: dict[str, ChannelAccumulator] = {}
    recorder = _Recorder(graph_module, set(nodes), accumulators, batchnorm_statistics or {})
    with torch.no_grad():
        for batch in batches:
            recorder.run(batch)
    return accumulators
