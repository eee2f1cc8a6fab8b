"""Data-free BatchNorm recalibration: write the analytic statistics of each BatchNorm's input into its
running statistics (MATH.md section 3, "fixed statistics").

Propagation runs with every BatchNorm in its analytic form (normalizing by the moments of its own input), so
one pass yields the statistics each BatchNorm sees once all BatchNorms upstream are recalibrated too; the
eval-mode copy then normalizes the data distribution to ``(beta, gamma^2)`` up to the approximations of the
moment rules.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn as nn

from .errors import GraphnormError
from .propagate import Accuracy, MomentPropagator, auto_spatial
from .stats import InputStats

__all__ = ["analytic_batchnorm_inputs", "recalibrate_batchnorm"]


def analytic_batchnorm_inputs(propagator: MomentPropagator, stats: InputStats
                              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{BatchNorm module path: (mean, var)}`` of each BatchNorm module's input, per channel.

    ``propagator`` must be built with ``batch_norm="analytic"``. A BatchNorm module called at two call sites
    sees two inputs and cannot hold both in its running statistics: that raises.
    """
    if propagator.batch_norm != "analytic":
        raise GraphnormError("analytic_batchnorm_inputs needs a MomentPropagator built with batch_norm='analytic'")
    table = propagator.run(stats)
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in propagator.graph_module.graph.nodes:
        if node.op != "call_module" or node.meta.get("graphnorm.op") != "batch_norm":
            continue
        if node.target in found:
            raise GraphnormError(f"BatchNorm module '{node.target}' is called at two call sites; its running "
                                 "statistics cannot hold both inputs' statistics")
        moments = table[node.args[0].name]
        found[str(node.target)] = (moments.mean.detach(), moments.var.detach())
    return found


def recalibrate_batchnorm(model: nn.Module, stats: InputStats, input_shape: Iterable[int], *,
                          spatial: bool | Literal["auto"] = "auto", accuracy: Accuracy = "accurate",
                          leaf_modules: Iterable[type | str] = (), concrete_args: dict[str, Any] | None = None
                          ) -> nn.Module:
    """A deep copy of ``model`` in eval mode whose BatchNorm running statistics are the analytic ones.

    ``spatial="auto"`` propagates per unit where borders matter (:func:`graphnorm.propagate.auto_spatial`),
    and ``accuracy="accurate"`` corrects activations for skewed inputs, like ``convert(..., mode="fixed")``."""
    input_shape = tuple(int(size) for size in input_shape)
    if spatial == "auto":
        spatial = auto_spatial(input_shape, stats)
    calibrated = copy.deepcopy(model).eval()
    propagator = MomentPropagator(calibrated, input_shape, spatial=spatial, batch_norm="analytic", accuracy=accuracy,
                                  leaf_modules=leaf_modules, concrete_args=concrete_args)
    with torch.no_grad():
        for path, (mean, var) in analytic_batchnorm_inputs(propagator, stats).items():
            module = calibrated.get_submodule(path)
            if module.running_mean is None:
                continue  # batch statistics only: nothing to recalibrate
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
    return calibrated
