"""The inspect report as data, and its renderers: JSON (versioned schema), Markdown, a rich table, and a
signal-propagation plot (analytic dashed, measured solid), in the style of the NF-ResNet plots of
Brock, De & Smith (2021), with the analytic curves that graphnorm adds.

JSON schema (``schema_version`` 1)::

    {"schema_version": 1, "model": str, "input_shape": [int], "normalize": "as-is" | "analytic",
     "spatial": bool, "samples": int | null, "std_floor": float,
     "summary": {"batchnorm_inputs": int, "std_error_median": float | null, "std_error_worst": float | null,
                 "mean_error_median": float | null, "mean_error_worst": float | null},
     "rows": [{"node": str, "op": str | null, "module_path": str | null, "channels": int, "depth": int,
               "batchnorm_input": bool,
               "analytic": {"mean_sq": float, "var": float, "std_min": float, "std_max": float},
               "measured": {same} | null,
               "std_error_median": float | null, "std_error_worst": float | null,
               "mean_error_median": float | null, "mean_error_worst": float | null,
               "dead_channels": int | null,
               "residual_branch": {"branch": str, "analytic_var": float, "measured_var": float | null} | null}]}

Errors (:func:`relative_errors`): the std error is ``|analytic std - measured std| / d`` per channel, the mean
error ``|analytic mean - measured mean| / d``, with ``d = max(measured std, STD_FLOOR x the site's median
measured std)``: a channel whose measured std is near zero (a dead ReLU unit, a constant) is not divided by
that zero but by a tenth of the site's typical std, and is counted in ``dead_channels``. Each error is
summarized over channels by median and worst. (Added in place in schema 1: ``dead_channels``; the floor.)
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

__all__ = ["SCHEMA_VERSION", "STD_FLOOR", "ChannelSummary", "Report", "ReportRow", "ResidualBranch", "relative_errors"]

SCHEMA_VERSION = 1
STD_FLOOR = 0.1  # of the site's median measured std: the smallest std a relative error divides by


def relative_errors(analytic_mean: torch.Tensor, analytic_std: torch.Tensor, measured_mean: torch.Tensor,
                    measured_std: torch.Tensor, floor: float = STD_FLOOR
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel std and mean errors of analytic against measured statistics, relative to the measured std
    floored at ``floor`` times the site's median measured std (module docstring), and the number of channels
    below that floor ("dead": their std is noise around zero, and dividing by it reported errors of 1e10)."""
    typical = measured_std.median()
    threshold = floor * typical
    scale = torch.maximum(measured_std, threshold).clamp_min(torch.finfo(measured_std.dtype).tiny)
    std_error = (analytic_std - measured_std).abs() / scale
    mean_error = (analytic_mean - measured_mean).abs() / scale
    return std_error, mean_error, int((measured_std < threshold).sum())


@dataclass
class ChannelSummary:
    """Channel-averaged squared mean and variance, and the range of the per-channel std."""

    mean_sq: float
    var: float
    std_min: float
    std_max: float


@dataclass
class ResidualBranch:
    """For an add of a residual branch and its skip: the branch's channel-averaged variance."""

    branch: str
    analytic_var: float
    measured_var: float | None = None


@dataclass
class ReportRow:
    node: str
    op: str | None
    module_path: str | None
    channels: int
    depth: int
    batchnorm_input: bool
    analytic: ChannelSummary
    measured: ChannelSummary | None = None
    std_error_median: float | None = None
    std_error_worst: float | None = None
    mean_error_median: float | None = None
    mean_error_worst: float | None = None
    dead_channels: int | None = None  # measured std below STD_FLOOR x the site's median (relative_errors)
    residual_branch: ResidualBranch | None = None
    sampled: str | None = None  # why this node's moments come from the sampled fallback (None: closed form)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


@dataclass
class Report:
    model: str
    input_shape: list[int]
    normalize: str
    spatial: bool
    samples: int | None
    rows: list[ReportRow] = field(default_factory=list)
    seed: int | None = None
    input_statistics: str = "per channel"
    accuracy: str = "fast"

    @property
    def summary(self) -> dict[str, Any]:
        """Median and worst errors over the BatchNorm inputs (of the per-channel medians / worsts)."""
        inputs = [r for r in self.rows if r.batchnorm_input and r.std_error_median is not None]

        def pick(values: list[float], how) -> float | None:
            return how(values) if values else None

        return {"batchnorm_inputs": sum(r.batchnorm_input for r in self.rows),
                "std_error_median": pick([r.std_error_median for r in inputs], statistics.median),
                "std_error_worst": pick([r.std_error_worst for r in inputs], max),
                "mean_error_median": pick([r.mean_error_median for r in inputs], statistics.median),
                "mean_error_worst": pick([r.mean_error_worst for r in inputs], max)}

    def only_batchnorm_inputs(self) -> Report:
        return Report(self.model, self.input_shape, self.normalize, self.spatial, self.samples,
                      [r for r in self.rows if r.batchnorm_input], self.seed, self.input_statistics, self.accuracy)

    # -- JSON ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "input_shape": list(self.input_shape),
                "normalize": self.normalize, "spatial": self.spatial, "samples": self.samples,
                "seed": self.seed, "input_statistics": self.input_statistics, "accuracy": self.accuracy,
                "std_floor": STD_FLOOR, "summary": self.summary,
                "rows": [asdict(r) for r in self.rows]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {data.get('schema_version')!r}")
        rows = []
        for row in data["rows"]:
            row = dict(row)
            row["analytic"] = ChannelSummary(**row["analytic"])
            row["measured"] = ChannelSummary(**row["measured"]) if row["measured"] else None
            row["residual_branch"] = ResidualBranch(**row["residual_branch"]) if row["residual_branch"] else None
            rows.append(ReportRow(**row))
        return cls(data["model"], data["input_shape"], data["normalize"], data["spatial"], data["samples"], rows,
                   data.get("seed"), data.get("input_statistics", "per channel"), data.get("accuracy", "fast"))

    # -- text --------------------------------------------------------------------------------------------------------
    _COLUMNS = ("node", "op", "C", "BN in", "mean^2 analytic", "mean^2 measured", "var analytic", "var measured",
                "std err med", "std err worst", "mean err med", "dead")

    def _cells(self, row: ReportRow) -> list[str]:
        measured = row.measured
        op = f"{row.op} (sampled)" if row.sampled else str(row.op)
        return [row.node, op, str(row.channels), "yes" if row.batchnorm_input else "",
                _fmt(row.analytic.mean_sq), _fmt(measured.mean_sq if measured else None), _fmt(row.analytic.var),
                _fmt(measured.var if measured else None), _fmt(row.std_error_median, 3),
                _fmt(row.std_error_worst, 3), _fmt(row.mean_error_median, 3),
                "-" if row.dead_channels is None else str(row.dead_channels)]

    def _title(self) -> str:
        samples = f"{self.samples} samples" if self.samples else "no measurement"
        seed = f" (seed {self.seed})" if self.seed is not None and self.samples else ""
        return (f"{self.model}, input {tuple(self.input_shape)}, normalize {self.normalize}, propagated "
                f"{'per unit' if self.spatial else 'per channel'} ({self.accuracy}) from input statistics "
                f"{self.input_statistics}, {samples}{seed}")

    def _summary_line(self) -> str:
        s = self.summary
        return (f"BatchNorm inputs: {s['batchnorm_inputs']}; std error median {_fmt(s['std_error_median'], 3)}, "
                f"worst {_fmt(s['std_error_worst'], 3)}; mean error (in std) median "
                f"{_fmt(s['mean_error_median'], 3)}, worst {_fmt(s['mean_error_worst'], 3)} (errors relative to the "
                f"measured std, floored at {STD_FLOOR:g} x the site's median; dead: channels below it)")

    def to_markdown(self) -> str:
        lines = [f"**{self._title()}**", "", self._summary_line(), "",
                 "| " + " | ".join(self._COLUMNS) + " |", "|" + "---|" * len(self._COLUMNS)]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def to_table(self) -> Table:
        table = Table(title=self._title(), caption=self._summary_line())
        for column in self._COLUMNS:
            table.add_column(column, justify="left" if column in ("node", "op") else "right", no_wrap=column == "node")
        for row in self.rows:
            table.add_row(*self._cells(row), style="bold" if row.batchnorm_input else None)
        return table

    # -- plot --------------------------------------------------------------------------------------------------------
    def signal_rows(self) -> list[ReportRow]:
        """The activations a signal-propagation plot follows: the inputs of the BatchNorms (what
        normalization sees) and the outputs of residual adds (the residual stream), in graph order."""
        return [r for r in self.rows if r.batchnorm_input or r.residual_branch is not None]

    def plot_series(self) -> dict[str, tuple[list[int], list[float]]]:
        """The curves :meth:`plot` draws: ``{name: (positions, values)}``, positions counting
        :meth:`signal_rows` in graph order."""
        series: dict[str, tuple[list[int], list[float]]] = {}

        def add(name: str, position: int, value: float | None) -> None:
            if value is not None:
                xs, ys = series.setdefault(name, ([], []))
                xs.append(position)
                ys.append(value)

        for position, row in enumerate(self.signal_rows()):
            add("avg channel squared mean (analytic)", position, row.analytic.mean_sq)
            add("avg channel variance (analytic)", position, row.analytic.var)
            if row.measured is not None:
                add("avg channel squared mean (measured)", position, row.measured.mean_sq)
                add("avg channel variance (measured)", position, row.measured.var)
            if row.residual_branch is not None:
                add("residual branch variance (analytic)", position, row.residual_branch.analytic_var)
                add("residual branch variance (measured)", position, row.residual_branch.measured_var)
        return series

    def plot(self, path: str | os.PathLike) -> Any:
        """Write a PNG signal-propagation plot to ``path`` (atomically); returns the matplotlib Figure.
        Needs matplotlib (``pip install graphnorm[plot]``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise RuntimeError("plotting needs matplotlib: pip install 'graphnorm[plot]'") from err
        colors = {"squared mean": "tab:blue", "variance (": "tab:orange", "residual": "tab:green"}
        figure, axes = plt.subplots(figsize=(11, 6), dpi=100)
        for name, (xs, ys) in self.plot_series().items():
            color = next(c for key, c in colors.items() if key in name)
            analytic = "(analytic)" in name
            style = {"linestyle": "--" if analytic else "-", "linewidth": 1.4 if analytic else 1.8,
                     "marker": "." if not analytic else None}
            if "residual" in name:
                style.update(linestyle="none", marker="x" if analytic else "o", markersize=7, fillstyle="none")
            axes.plot(xs, ys, color=color, label=name, **style)
        rows = self.signal_rows()
        for position, row in enumerate(rows):
            if row.residual_branch is not None:
                axes.axvline(position, color="0.88", linewidth=0.8, zorder=0)
        axes.set_yscale("symlog", linthresh=1e-3)
        axes.set_ylim(bottom=0)
        axes.set_xlabel("BatchNorm inputs and residual-add outputs (grey lines), in graph order")
        axes.set_ylabel("channel average (symlog)")
        labels = [r.node for r in rows]
        step = max(1, len(labels) // 24)
        axes.set_xticks(range(0, len(labels), step))
        axes.set_xticklabels(labels[::step], rotation=60, ha="right", fontsize=7)
        axes.set_title(f"Signal propagation: {self._title()}", fontsize=10)
        axes.legend(fontsize=8, loc="best")
        figure.tight_layout()
        target = Path(path)
        temporary = target.with_name(f".{target.name}.tmp.png")
        try:
            figure.savefig(temporary)
            os.replace(temporary, target)
        finally:
            if temporary.exists():
                temporary.unlink()
        plt.close(figure)
        return figure
