"""The training benchmarks' quick settings run and produce every variant (the full grids are not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def run_quick(script: str, tmp_path) -> dict:
    """Run ``benchmarks/<script>.py --quick`` with its results in ``tmp_path``; return its JSON result."""
    env = {**os.environ, "GRAPHNORM_RESULTS": str(tmp_path)}
    completed = subprocess.run([sys.executable, os.path.join(BENCHMARKS, f"{script}.py"), "--quick"],
                               capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr
    return json.loads((tmp_path / f"{script}_quick.json").read_text())


def test_quick_training_benchmark(tmp_path) -> None:
    result = run_quick("train", tmp_path)
    variants = {row["variant"] for row in result["rows"]}
    assert variants == {"batchnorm", "groupnorm", "layernorm", "evonorm_s0", "frn_tlu", "none", "analytic",
                        "reparam", "normprop", "analytic+noise", "analytic+learned"}
    assert all(row["accuracy_mean"] is not None or row["failed"] for row in result["rows"])
    for row in result["rows"]:  # NLL and ECE for every run, the K-sample predictive for the noisy variants
        noisy = row["variant"] in ("analytic+noise", "analytic+learned")
        assert row["test_nll_mean"] > 0 and 0 <= row["test_ece_mean"] <= 1
        assert (row["predictive_nll_mean"] is not None) == noisy
    graphnorm_rows = [row for row in result["rows"] if row["variant"] in ("analytic", "reparam", "normprop")]
    assert all(row["accuracy_mean"] > 0.5 for row in graphnorm_rows if row["batch"] == 2)


def test_quick_finetune_benchmark(tmp_path) -> None:
    """Every variant that keeps the pretrained function (all but the two that adapt to the new data) starts from
    the pretrained model's accuracy on the shifted task, and fine-tuning improves every variant."""
    rows = {row["variant"]: row for row in run_quick("finetune", tmp_path)["rows"]}
    assert set(rows) == {"batchnorm", "frozen", "bn-eval", "analytic", "reparam", "normprop", "analytic-data",
                         "analytic-adapt"}
    assert not any(row["failed"] for row in rows.values())
    start = rows["batchnorm"]["before"]
    assert all(rows[name]["before"] == start for name in ("frozen", "bn-eval", "analytic", "reparam", "normprop"))
    assert all(row["after_mean"] > row["before"] for row in rows.values())


def _square_or_fail(job: int) -> dict:
    if job < 0:
        raise RuntimeError("interrupted")
    return {"job": job, "square": job * job}


def test_grid_resumes_from_its_journal(tmp_path, monkeypatch) -> None:
    """A grid interrupted part-way keeps its finished runs in the journal and runs only the rest next time."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    from common import run_grid

    journal = tmp_path / "grid.journal.jsonl"
    calls: list[int] = []

    def counted(job: int) -> dict:
        calls.append(job)
        return _square_or_fail(job)

    with pytest.raises(RuntimeError):  # the third job "interrupts" the grid after two finished
        run_grid(counted, [1, 2, -3, 4], workers=1, journal=journal)
    assert len(journal.read_text().splitlines()) == 2
    calls.clear()
    results = run_grid(counted, [1, 2, 3, 4], workers=1, journal=journal)
    assert calls == [3, 4]
    assert [r["square"] for r in results] == [1, 4, 9, 16]
    assert not journal.exists()
    assert [r["square"] for r in run_grid(_square_or_fail, [5, 6], workers=2, journal=journal)] == [25, 36]


def test_quick_train_step_benchmark(tmp_path) -> None:
    """Every variant of the step benchmark runs and is timed, and the statistics of each graphnorm mode are
    counted (the recorded program's ops; the ATen ops a step dispatches)."""
    result = run_quick("train_step", tmp_path)["results"][0]
    variants = {row["variant"] for row in result["rows"]}
    assert variants == {"BatchNorm", "GroupNorm(32)", "FrozenBatchNorm2d", "weight_norm, no BN", "no normalization",
                        "graphnorm analytic", "graphnorm reparam", "graphnorm normprop"}
    assert all(row["median_ms"] > 0 and row["ratio_to_batchnorm"] > 0 for row in result["rows"])
    counts = result["statistics"]
    assert 0 < counts["analytic"]["program_ops"] < 150 and counts["analytic"]["dispatched"]["backward"] > 0
    assert counts["normprop"]["program_ops"] == 0  # NormProp's statistics are its layers' weight norms
