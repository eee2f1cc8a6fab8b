"""graphnorm.inspect and `graphnorm inspect`: analytic columns against propagate, measured columns against an
independent hook-based measurement, renderers, plot data, bounded memory, CLI."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from conversion_models import conv_chain

import graphnorm
from graphnorm import InputStats, Report
from graphnorm.cli import main

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
STATS = InputStats([0.3, -0.2, 0.1], [1.0, 0.5, 2.0])


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(x + self.branch(x))


def test_analytic_columns_equal_propagate_and_measured_columns_equal_hooks() -> None:
    model = Residual().eval()
    data = STATS.sample((96, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    report = graphnorm.inspect(model, STATS, input_shape=(1, 3, 8, 8), data=data, batch_size=32, progress=False)
    assert report.spatial  # the default for an 8x8 input: per unit
    table = graphnorm.propagate(model, STATS, (1, 3, 8, 8), spatial=True, accuracy="accurate")  # the defaults
    rows = {r.node: r for r in report.rows}
    for name, moments in table.items():
        assert rows[name].analytic.var == pytest.approx(moments.var.mean().item(), rel=1e-6)
        assert rows[name].analytic.mean_sq == pytest.approx(moments.mean.square().mean().item(), rel=1e-6, abs=1e-12)
    outputs = {}
    hooks = [model.branch[3].register_forward_hook(lambda m, a, out: outputs.setdefault("branch_3", out))]
    with torch.no_grad():
        model(data)
    for hook in hooks:
        hook.remove()
    reference = outputs["branch_3"].double().transpose(0, 1).reshape(8, -1)
    assert rows["branch_3"].measured.var == pytest.approx(reference.var(1, unbiased=False).mean().item(), rel=1e-9)
    assert rows["branch_3"].batchnorm_input and rows["add"].residual_branch.branch == "branch_4"
    assert report.samples == 96 and report.summary["batchnorm_inputs"] == 3
    assert not any(m._forward_hooks for m in model.modules())


def test_normalize_analytic_uses_the_analytic_statistics() -> None:
    model = conv_chain().eval()  # running statistics 0/1: as-is, the BatchNorm outputs are far from (beta, gamma^2)
    as_is = graphnorm.inspect(model, STATS, input_shape=(1, 3, 8, 8), samples=256, progress=False, spatial=True)
    analytic = graphnorm.inspect(model, STATS, input_shape=(1, 3, 8, 8), samples=256, progress=False,
                                 spatial=True, normalize="analytic")
    assert analytic.summary["std_error_median"] < 0.05
    first_bn = next(r for r in analytic.rows if r.op == "batch_norm")
    gamma = model[1].weight.detach()
    assert first_bn.measured.var == pytest.approx(gamma.square().mean().item(), rel=0.05)
    assert next(r for r in as_is.rows if r.op == "batch_norm").measured.var != pytest.approx(
        first_bn.measured.var, rel=0.05)


def test_renderers_and_json_round_trip(tmp_path) -> None:
    report = graphnorm.inspect(Residual(), STATS, input_shape=(1, 3, 8, 8), samples=64, progress=False)
    text = report.to_json()
    data = json.loads(text)
    assert data["schema_version"] == 1 and data["summary"]["batchnorm_inputs"] == 3
    again = Report.from_json(text)
    assert again.to_dict() == report.to_dict()
    markdown = report.to_markdown()
    assert markdown.count("\n| ") == len(report.rows) + 1 and "std err med" in markdown
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report.to_table())
    assert "branch_3" in console.export_text()
    with pytest.raises(ValueError, match="schema_version"):
        Report.from_json(json.dumps({**data, "schema_version": 99}))


def test_plot_has_both_curves(tmp_path) -> None:
    report = graphnorm.inspect(Residual(), STATS, input_shape=(1, 3, 8, 8), samples=64, progress=False)
    path = tmp_path / "signal.png"
    figure = report.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = figure.get_size_inches() * figure.dpi
    assert 600 <= width <= 2000 and 400 <= height <= 1200
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    for kind in ("squared mean", "variance", "residual branch variance"):
        assert f"avg channel {kind} (analytic)" in lines or f"{kind} (analytic)" in lines
    analytic = lines["avg channel variance (analytic)"]
    measured = lines["avg channel variance (measured)"]
    assert analytic.get_linestyle() == "--" and measured.get_linestyle() == "-"
    series = report.plot_series()
    assert list(analytic.get_ydata()) == series["avg channel variance (analytic)"][1]
    assert len(series["avg channel variance (measured)"][1]) == len(report.signal_rows()) == 4


def test_memory_stays_bounded_over_many_batches() -> None:
    model = conv_chain(depth=2)

    def stream(count: int):
        generator = torch.Generator().manual_seed(2)
        for _ in range(count):
            yield (STATS.sample((64, 3, 8, 8), generator=generator), torch.zeros(64))

    def peak(count: int) -> int:
        tracemalloc.start()
        graphnorm.inspect(model, STATS, input_shape=(1, 3, 8, 8), data=stream(count), progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    assert peak(200) < 1.5 * peak(10) + 2_000_000


def test_cli_inspect(tmp_path) -> None:
    runner = CliRunner()
    digits = os.path.join(FIXTURES, "digits_cnn.pt")
    sample = os.path.join(FIXTURES, "digits_sample.npy")
    plot = tmp_path / "plot.png"
    result = runner.invoke(main, ["inspect", digits, "--data", sample, "--format", "json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["samples"] == 64 and plot.exists()
    only = runner.invoke(main, ["inspect", digits, "--no-empirical", "--only", "bn", "--format", "markdown"])
    assert only.exit_code == 0 and only.output.count("| yes |") == 2
    table = runner.invoke(main, ["inspect", digits, "--samples", "32", "--normalize", "analytic", "--spatial"])
    assert table.exit_code == 0 and "BatchNorm inputs: 2" in table.output
    refused = runner.invoke(main, ["inspect", digits, "--plot", str(plot)])
    assert refused.exit_code == 2 and "--force" in refused.output
    bad = runner.invoke(main, ["inspect", digits, "--format", "yaml"])
    assert bad.exit_code == 2
    wrong = runner.invoke(main, ["inspect", digits, "--plot", str(tmp_path / "plot.jpg")])
    assert wrong.exit_code == 2 and ".png" in wrong.output


def test_the_table_off_a_terminal_prints_every_number_in_full() -> None:
    """Piped into a file or a pager (CliRunner is not a terminal either), no cell is cut to '0.1…': every cell of
    the Markdown rendering appears whole in the table."""
    runner = CliRunner()
    args = ["inspect", os.path.join(FIXTURES, "digits_cnn.pt"), "--samples", "32"]
    table = runner.invoke(main, args)
    markdown = runner.invoke(main, [*args, "--format", "markdown"])
    assert table.exit_code == 0 and markdown.exit_code == 0
    assert "…" not in table.output
    cells = {cell.strip() for line in markdown.output.splitlines() if line.startswith("| ")
             for cell in line.strip().strip("|").split("|")}
    missing = sorted(cell for cell in cells if cell and cell not in table.output)
    assert not missing, missing


def _inspect_json(*args: str) -> dict:
    result = CliRunner().invoke(main, ["inspect", *args, "--format", "json", "--only", "bn"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_a_report_is_reproducible_and_says_how_it_was_computed() -> None:
    """Two runs of one command give one report (the random model and the drawn inputs are seeded); another
    seed gives another model; the report states seed, representation and input statistics."""
    args = ("graphnorm.zoo:DigitsCNN", "--input-shape", "1,1,8,8", "--samples", "64")
    first, again, other = _inspect_json(*args), _inspect_json(*args), _inspect_json(*args, "--seed", "1")
    assert first == again
    assert first["rows"][0]["analytic"] != other["rows"][0]["analytic"]
    assert (first["seed"], other["seed"], first["spatial"], first["input_statistics"]) == (0, 1, True, "per channel")
    forced = _inspect_json(*args, "--per-channel")
    assert forced["spatial"] is False


def test_input_statistics_per_position_with_patch_correlation_from_the_command_line() -> None:
    data = os.path.join(FIXTURES, "digits_sample.npz")
    report = _inspect_json(os.path.join(FIXTURES, "digits_cnn.pt"), "--input-data", data, "--data", data,
                           "--per-position", "--patch-covariance", "3")
    assert report["input_statistics"] == "per position with 5x5 correlation" and report["spatial"] is True
    plain = _inspect_json(os.path.join(FIXTURES, "digits_cnn.pt"), "--input-data", data, "--data", data,
                          "--per-channel-input")
    assert plain["input_statistics"] == "per channel"
    first_bn = {r["node"]: r for r in report["rows"]}["features_0"]
    plain_first_bn = {r["node"]: r for r in plain["rows"]}["features_0"]
    assert first_bn["std_error_median"] < 0.02 < plain_first_bn["std_error_median"]


def test_input_data_is_described_per_position_with_its_patch_correlation_by_default(tmp_path) -> None:
    """What describes real images (docs/math.md 1.1) is inspect's default for --input-data: the same report as
    asking for it; data of another size than the input falls back to per channel, saying so."""
    data = os.path.join(FIXTURES, "digits_sample.npz")
    default = _inspect_json(os.path.join(FIXTURES, "digits_cnn.pt"), "--input-data", data, "--data", data)
    asked = _inspect_json(os.path.join(FIXTURES, "digits_cnn.pt"), "--input-data", data, "--data", data,
                          "--per-position", "--patch-covariance", "3")
    assert default["input_statistics"] == "per position with 5x5 correlation"
    assert default["rows"] == asked["rows"]
    larger = tmp_path / "larger.npz"
    np.savez(larger, x=np.random.default_rng(0).random((20, 1, 16, 16), dtype=np.float32))
    result = CliRunner().invoke(main, ["inspect", os.path.join(FIXTURES, "digits_cnn.pt"), "--input-data",
                                       str(larger), "--no-empirical"])
    assert result.exit_code == 0, result.output
    assert "note: input statistics from --input-data per channel: its samples are not maps of the input's size" \
        in result.output


def test_structure_options_need_input_data() -> None:
    result = CliRunner().invoke(main, ["inspect", "graphnorm.zoo:DigitsCNN", "--input-shape", "1,1,8,8",
                                       "--per-position"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --per-position and --patch-covariance describe --input-data FILE; give it"]


def test_relative_errors_floor_the_measured_std_and_count_dead_channels() -> None:
    from graphnorm.report import STD_FLOOR, relative_errors

    measured_std = torch.tensor([1.0, 2.0, 1e-9, 3.0, 0.0], dtype=torch.float64)  # median 1.0
    analytic_std = torch.tensor([1.1, 2.0, 0.05, 2.7, 0.0], dtype=torch.float64)
    mean = torch.zeros(5, dtype=torch.float64)
    std_error, mean_error, dead = relative_errors(mean + 0.5, analytic_std, mean, measured_std)
    assert STD_FLOOR == 0.1 and dead == 2
    expected = [0.1 / 1.0, 0.0, (0.05 - 1e-9) / 0.1, 0.3 / 3.0, 0.0]
    assert std_error.tolist() == pytest.approx(expected, rel=1e-9)
    assert mean_error.tolist() == pytest.approx([0.5, 0.25, 5.0, 0.5 / 3.0, 5.0], rel=1e-9)
