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

__all__ = ["ChannelAccumulator", "measure"]


class ChannelAccumulator:
    """Streaming per-channel (dim 1) mean and population variance of tensors ``[N, C, ...]`` or ``[N, F]``."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, batch: torch.Tensor) -> None:
        values = batch.detach().to(torch.float64).transpose(0, 1).reshape(batch.shape[1], -1)
        count = values.shape[1]
        if count == 0:
            return
        mean = values.mean(dim=1)
        m2 = (values - mean[:, None]).square().sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        assert self.m2 is not None, "no data was added"
        return self.m2 / self.count


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
