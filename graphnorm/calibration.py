"""Which statistics a conversion calibrates to (MATH.md section 7, docs/math.md "Calibrated conversion").

A trained BatchNorm carries running statistics: the statistics of its input on the data the network learned
from. The analytic statistics of the same input, computed from per-channel input statistics under the
independence assumption, can be far from them on real data, and normalizing with one instead of the other
changes what the network computes. Calibration keeps, per channel, the fixed correction between the two
(:class:`graphnorm.normalizers.Calibration`), so a converted model computes what the original computes in eval
at conversion and still follows its weights afterwards.

The targets of that correction, per BatchNorm call site:

- ``"running"``: the site's running statistics;
- ``"data"``: statistics of the site's input measured on given data, with every BatchNorm before it already
  normalizing with its own measured statistics (what BatchNorm in train mode would compute with the whole data
  set as one batch). Measured one BatchNorm depth level per pass over the data, so the cost is
  ``depth x one eval pass``;
- ``"none"``: no calibration (the analytic statistics as they are).

``"auto"`` (the default) calibrates to the running statistics of every site whose running statistics were
trained (``num_batches_tracked > 0``, or values other than BatchNorm's initial mean 0 and variance 1), and
leaves the rest uncalibrated; in ``fixed`` mode it means ``"none"`` (fixed mode *is* the data-free
recalibration).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import fx

from .errors import GraphnormError
from .graphs import parameter_dtype
from .measure import measure
from .stats import iter_batches

__all__ = ["CALIBRATIONS", "Calibrate", "has_trained_statistics", "measure_batchnorm_inputs", "resolve_calibration"]

Calibrate = Literal["auto", "running", "data", "none"]
CALIBRATIONS = ("auto", "running", "data", "none")


def has_trained_statistics(site: Any) -> bool:
    """Whether a BatchNorm call site's running statistics were trained: it tracked batches, or its statistics
    differ from BatchNorm's initial ``(0, 1)`` (a checkpoint that does not count batches)."""
    if site.running_mean is None or site.running_var is None:
        return False
    if site.tracked_batches is not None and site.tracked_batches > 0:
        return True
    return bool((site.running_mean != 0).any() or (site.running_var != 1).any())


def resolve_calibration(calibrate: str, mode: str, sites: list[Any], data: Any) -> tuple[str, set[str]]:
    """The calibration a conversion applies (``"running"``, ``"data"`` or ``"none"``) and the names of the
    BatchNorm nodes it calibrates. Raises :class:`GraphnormError` for a combination that cannot work."""
    if calibrate not in CALIBRATIONS:
        raise GraphnormError(f"calibrate must be one of {', '.join(CALIBRATIONS)}; got {calibrate!r}")
    names = {site.node.name for site in sites}
    if calibrate == "auto":
        if mode == "fixed":
            return "none", set()
        trained = {site.node.name for site in sites if has_trained_statistics(site)}
        return ("running", trained) if trained else ("none", set())
    if calibrate == "running":
        if mode == "fixed":
            raise GraphnormError("fixed mode with calibrate='running' would keep every BatchNorm as it is; use the "
                                 "original model, or calibrate='data' to recalibrate its statistics on data")
        missing = [site.module_path or site.node.name for site in sites
                   if site.running_mean is None or site.running_var is None]
        if missing:
            raise GraphnormError(f"calibrate='running' but BatchNorm {', '.join(missing)} has no running statistics; "
                                 "use calibrate='data' with data, or calibrate='auto'")
        return "running", names
    if calibrate == "data":
        if data is None:
            raise GraphnormError("calibrate='data' needs data: pass data=... (the CLI's --input-data)")
        if isinstance(data, Iterator):
            raise GraphnormError("calibrate='data' reads the data several times: pass a tensor or a re-iterable "
                                 "such as a DataLoader, not an iterator")
        return "data", names
    return "none", set()


def _batches(data: Any, batch_size: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for batch in iter_batches(data):
        yield from (batch.to(dtype) if batch.is_floating_point() else batch).split(batch_size)


def _batchnorm_ancestors(graph_module: fx.GraphModule, bn_nodes: set[str]) -> dict[str, set[str]]:
    """For every BatchNorm node, the BatchNorm nodes its input depends on."""
    upstream: dict[str, set[str]] = {}
    for node in graph_module.graph.nodes:
        found: set[str] = set()
        for arg in node.all_input_nodes:
            found |= upstream[arg.name]
            if arg.name in bn_nodes:
                found.add(arg.name)
        upstream[node.name] = found
    return {name: upstream[name] for name in bn_nodes}


def measure_batchnorm_inputs(graph_module: fx.GraphModule, sites: list[Any], data: Iterable[Any], *,
                             batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{BatchNorm node: (mean, var)}`` of each site's input on ``data`` (population variance, float64), every
    BatchNorm upstream of it normalizing with its own measured statistics.

    One pass over the data per BatchNorm depth level: a pass measures the sites whose upstream BatchNorms are
    all measured already. ``graph_module`` must be in eval mode (nothing is updated); floating-point data is cast
    to the dtype of its parameters."""
    dtype = parameter_dtype(graph_module)
    by_name = {site.node.name: site for site in sites}
    ancestors = _batchnorm_ancestors(graph_module, set(by_name))
    measured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    while len(measured) < len(by_name):
        ready = [name for name in by_name if name not in measured and ancestors[name] <= measured.keys()]
        inputs = {name: by_name[name].input_name for name in ready}
        accumulators = measure(graph_module, _batches(data, batch_size, dtype), set(inputs.values()),
                               batchnorm_statistics=measured)
        for name, input_name in inputs.items():
            if input_name not in accumulators:
                raise GraphnormError(f"data gave no values at the input of BatchNorm '{name}'")
            measured[name] = (accumulators[input_name].mean, accumulators[input_name].var)
    return measured
