"""Analytic statistics beside measured ones at the BatchNorm inputs: the accuracy check of moment propagation.

Every BatchNorm call site normalizes with the analytic statistics of its input, in the propagation and in
the measured network alike, so the network that is measured is normalized the way graphnorm would
normalize it; then the per-channel std that propagation predicts at each BatchNorm input is compared with the
std measured by running the network on data.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .measure import analytic_batchnorm_statistics, measure
from .propagate import MomentPropagator
from .stats import InputStats

__all__ = ["StdComparison", "compare_batchnorm_inputs"]


@dataclass(frozen=True)
class StdComparison:
    """Per-channel analytic and measured std of one activation."""

    node: str
    analytic: torch.Tensor
    measured: torch.Tensor

    @property
    def relative_error(self) -> torch.Tensor:
        """``|analytic - measured| / measured`` per channel."""
        return (self.analytic - self.measured).abs() / self.measured


def compare_batchnorm_inputs(model: nn.Module, stats: InputStats, input_shape: tuple[int, ...],
                             batches: Iterable[torch.Tensor], *, spatial: bool = False) -> list[StdComparison]:
    """Analytic vs measured per-channel std at every BatchNorm input, in graph order."""
    propagator = MomentPropagator(copy.deepcopy(model).eval(), input_shape, spatial=spatial, batch_norm="analytic")
    with torch.no_grad():
        table = propagator.run(stats)
    graph_module = propagator.graph_module
    bn_inputs = [node.args[0].name for node in graph_module.graph.nodes
                 if node.meta.get("graphnorm.op") == "batch_norm"]
    measured = measure(graph_module, batches, bn_inputs,
                       batchnorm_statistics=analytic_batchnorm_statistics(graph_module, table))
    return [StdComparison(name, table[name].std.detach().double(), measured[name].var.sqrt()) for name in bn_inputs]
