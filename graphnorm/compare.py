"""Analytic statistics beside measured ones at the BatchNorm inputs: the accuracy check of moment propagation.

Every BatchNorm is first recalibrated to the analytic statistics of its input (data-free, see
:mod:`graphnorm.recalibrate`), so the network that is measured is normalized the way graphnorm would
normalize it; then the per-channel std that propagation predicts at each BatchNorm input is compared with the
std measured by running the network on data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .measure import measure
from .propagate import MomentPropagator
from .recalibrate import recalibrate_batchnorm
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
    calibrated = recalibrate_batchnorm(model, stats, input_shape, spatial=spatial)
    propagator = MomentPropagator(calibrated, input_shape, spatial=spatial)
    with torch.no_grad():
        table = propagator.run(stats)
    bn_inputs = [node.args[0].name for node in propagator.graph_module.graph.nodes
                 if node.meta.get("graphnorm.op") == "batch_norm"]
    measured = measure(propagator.graph_module, batches, bn_inputs)
    return [StdComparison(name, table[name].std.detach().double(), measured[name].var.sqrt()) for name in bn_inputs]
