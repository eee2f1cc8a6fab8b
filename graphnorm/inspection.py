"""``graphnorm.inspect``: analytic statistics of every activation beside measured ones (see report.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import fx

from .errors import GraphnormError
from .exported import as_module
from .measure import analytic_batchnorm_statistics, measure
from .propagate import Accuracy, MomentPropagator, auto_spatial
from .report import ChannelSummary, Report, ReportRow, ResidualBranch, relative_errors
from .sampling import DEFAULT_SAMPLES
from .stats import InputStats, iter_batches

__all__ = ["inspect"]


def _summary(mean: torch.Tensor, var: torch.Tensor) -> ChannelSummary:
    std = var.clamp_min(0).sqrt()
    return ChannelSummary(float(mean.square().mean()), float(var.mean()), float(std.min()), float(std.max()))


def _depths(graph_module: fx.GraphModule) -> dict[str, int]:
    """Longest path from the input, in nodes (a residual branch is deeper than its skip)."""
    depth: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        depth[node.name] = 1 + max((depth[a.name] for a in node.all_input_nodes), default=-1)
    return depth


def _sample_batches(stats: InputStats, shape: tuple[int, ...], samples: int, batch_size: int, seed: int
                    ) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, samples, batch_size):
        yield stats.sample((min(batch_size, samples - start), *shape[1:]), generator=generator)


def _with_progress(batches: Iterable[torch.Tensor], total: int | None, show: bool) -> Iterator[torch.Tensor]:
    if not show:
        yield from batches
        return
    columns = [TextColumn("measuring"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("measuring", total=total)
        for batch in batches:
            yield batch
            progress.advance(task, batch.shape[0])


def inspect(model: nn.Module | torch.export.ExportedProgram, stats: InputStats, *, input_shape: Iterable[int],
            data: Any = None,
            samples: int = 1024, spatial: bool | Literal["auto"] = "auto", leaf_modules: Iterable[type | str] = (),
            concrete_args: dict[str, Any] | None = None, batch_size: int = 64,
            normalize: Literal["as-is", "analytic"] = "as-is", empirical: bool = True,
            progress: bool = True, fallback: str = "sample", fallback_samples: int = DEFAULT_SAMPLES,
            seed: int = 0, accuracy: Accuracy = "accurate") -> Report:
    """Analytic per-channel statistics of every activation of ``model`` under ``stats``, and, when
    ``empirical``, the same measured on ``data`` (a tensor, an iterable of tensors or ``(x, y)`` pairs) or on
    ``samples`` inputs drawn from ``stats``, streamed in batches of ``batch_size``.

    ``normalize="as-is"`` measures the model in eval mode as it is; ``"analytic"`` makes every BatchNorm use the
    analytic statistics of its input, in both columns (what a converted model does). The model is not
    modified: a copy is traced and run, with no hooks. Ops without a closed-form rule are sampled
    (``fallback``, ``fallback_samples``: see :class:`~graphnorm.MomentPropagator`); their rows say so.

    ``spatial="auto"`` (default) propagates per unit where borders matter
    (:func:`graphnorm.propagate.auto_spatial`), per channel otherwise; the report states which. The drawn
    inputs come from a generator seeded with ``seed``, so a report is reproducible. ``accuracy="accurate"``
    (default) carries third cumulants and corrects activations for skewed inputs; ``"fast"`` is the
    Gaussian propagation the trainable modes use (see :class:`~graphnorm.MomentPropagator`).
    """
    if normalize not in ("as-is", "analytic"):
        raise GraphnormError(f"normalize must be 'as-is' or 'analytic', got {normalize!r}")
    input_shape = tuple(int(s) for s in input_shape)
    stats.validate_for(input_shape)
    if spatial == "auto":
        spatial = auto_spatial(input_shape, stats)
    working = copy.deepcopy(as_module(model)).eval()
    propagator = MomentPropagator(working, input_shape, spatial=spatial, leaf_modules=leaf_modules,
                                  concrete_args=concrete_args,
                                  batch_norm="analytic" if normalize == "analytic" else "auto",
                                  fallback=fallback, fallback_samples=fallback_samples, accuracy=accuracy)
    with torch.no_grad():
        table = propagator.run(stats)
    graph_module = propagator.graph_module
    nodes = {node.name: node for node in graph_module.graph.nodes}
    batchnorm_inputs = {n.args[0].name for n in graph_module.graph.nodes if n.meta.get("graphnorm.op") == "batch_norm"}
    names = list(table)
    measured = None
    counted = None
    if empirical:
        overrides = analytic_batchnorm_statistics(graph_module, table) if normalize == "analytic" else {}
        if data is None:
            source, total = _sample_batches(stats, input_shape, samples, batch_size, seed), samples
        else:
            source, total = iter_batches(data), None
        seen = [0]
        batches = _with_progress(_counted(_rebatched(source, batch_size), seen), total, progress)
        measured = measure(graph_module, batches, [n for n in names if n in nodes], batchnorm_statistics=overrides)
        counted = seen[0]
    depth = _depths(graph_module)
    rows = [_row(name, table[name], table.info[name], depth[name], name in batchnorm_inputs, measured, nodes, table,
                 depth) for name in names]
    for row in rows:
        if row.node in propagator.sampled:
            row.op = propagator.sampled[row.node].target
            row.sampled = propagator.sampled[row.node].reason
    return Report(type(model).__name__, list(input_shape), normalize, spatial, counted, rows,
                  seed if empirical and data is None else None, describe_input_statistics(stats), accuracy)


def describe_input_statistics(stats: InputStats) -> str:
    """How the input is described: "per channel", "per position", plus the correlation template if any."""
    text = "per position" if stats.is_per_position else "per channel"
    if stats.correlation is not None:
        window = "x".join(str(size) for size in stats.correlation.shape[2:]) or "full"
        text += f" with {window} correlation"
    return text


def _counted(batches: Iterable[torch.Tensor], seen: list[int]) -> Iterator[torch.Tensor]:
    for batch in batches:
        seen[0] += batch.shape[0]
        yield batch


def _rebatched(batches: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Split oversized batches so memory stays bounded by ``batch_size`` samples."""
    for batch in batches:
        yield from torch.split(batch.to(torch.get_default_dtype()), batch_size)


def _row(name, moments, info, depth, is_bn_input, measured, nodes, table, depths) -> ReportRow:
    row = ReportRow(name, info.op, info.module_path, moments.channels, depth, is_bn_input,
                    _summary(moments.mean.detach(), moments.var.detach()))
    node = nodes.get(name)
    accumulator = measured.get(name) if measured is not None else None
    if accumulator is not None:
        mean_m, var_m = accumulator.mean, accumulator.var
        row.measured = _summary(mean_m, var_m)
        std_error, mean_error, row.dead_channels = relative_errors(
            moments.mean.detach().double(), moments.std.detach().double(), mean_m.double(),
            var_m.clamp_min(0).sqrt().double())
        row.std_error_median, row.std_error_worst = float(std_error.median()), float(std_error.max())
        row.mean_error_median, row.mean_error_worst = float(mean_error.median()), float(mean_error.max())
    if node is not None and info.op == "add":
        operands = [a for a in node.args if isinstance(a, fx.Node) and a.name in table]
        if len(operands) == 2:
            branch = max(operands, key=lambda a: depths[a.name])
            measured_branch = measured.get(branch.name) if measured is not None else None
            row.residual_branch = ResidualBranch(
                branch.name, float(table[branch.name].var.detach().mean()),
                float(measured_branch.var.mean()) if measured_branch is not None else None)
    return row


