"""Empirical per-channel moments of every activation, measured by running the traced graph on data.

This is the reference the analytic moments are compared with (inspect reports, accuracy benchmarks). It runs
an ``fx.Interpreter`` over the traced graph (no hooks are left on the model), streams the batches, and merges
per-batch channel moments in float64 (Chan et al. parallel update), so memory is bounded by one batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from .stats import ChannelAccumulator

__all__ = ["ChannelAccumulator", "measure"]


class _Recorder(fx.Interpreter):
    def __init__(self, graph_module: fx.GraphModule, nodes: set[str], accumulators: dict[str, ChannelAccumulator]):
        super().__init__(graph_module, garbage_collect_values=True)
        self.nodes = nodes
        self.accumulators = accumulators

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.nodes and isinstance(value, torch.Tensor) and value.dim() >= 2:
            self.accumulators.setdefault(node.name, ChannelAccumulator()).add(value)
        return value


def measure(graph_module: fx.GraphModule, batches: Iterable[torch.Tensor], nodes: Iterable[str]
            ) -> dict[str, ChannelAccumulator]:
    """Per-channel moments of the outputs of ``nodes`` over all ``batches`` (run under ``torch.no_grad``)."""
    accumulators: dict[str, ChannelAccumulator] = {}
    recorder = _Recorder(graph_module, set(nodes), accumulators)
    with torch.no_grad():
        for batch in batches:
            recorder.run(batch)
    return accumulators
