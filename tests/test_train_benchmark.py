"""The training benchmark's quick setting runs and produces every variant (the full grid is not a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

BENCHMARK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train.py")


def test_quick_training_benchmark(tmp_path) -> None:
    env = {**os.environ, "GRAPHNORM_RESULTS": str(tmp_path)}
    completed = subprocess.run([sys.executable, BENCHMARK, "--quick"], capture_output=True, text=True, timeout=300,
                               env=env)
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "train_quick.json").read_text())
    variants = {row["variant"] for row in result["rows"]}
    assert variants == {"batchnorm", "groupnorm", "none", "analytic", "reparam", "normprop", "analytic+noise"}
    assert all(row["accuracy_mean"] is not None or row["failed"] for row in result["rows"])
    graphnorm_rows = [row for row in result["rows"] if row["variant"] in ("analytic", "reparam", "normprop")]
    assert all(row["accuracy_mean"] > 0.5 for row in graphnorm_rows if row["batch"] == 2)
