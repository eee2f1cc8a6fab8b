"""The fine-tuning benchmark's quick setting runs every variant, and every variant that keeps the pretrained
function (all but data calibration) starts from the pretrained model's accuracy (the full grid is not a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

BENCHMARK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "finetune.py")


def test_quick_finetune_benchmark(tmp_path) -> None:
    env = {**os.environ, "GRAPHNORM_RESULTS": str(tmp_path)}
    completed = subprocess.run([sys.executable, BENCHMARK, "--quick"], capture_output=True, text=True, timeout=300,
                               env=env)
    assert completed.returncode == 0, completed.stderr
    rows = {row["variant"]: row for row in json.loads((tmp_path / "finetune_quick.json").read_text())["rows"]}
    assert set(rows) == {"batchnorm", "frozen", "bn-eval", "analytic", "reparam", "normprop", "analytic-data"}
    assert not any(row["failed"] for row in rows.values())
    start = rows["batchnorm"]["before"]
    assert all(rows[name]["before"] == start for name in ("frozen", "bn-eval", "analytic", "reparam", "normprop"))
    assert all(row["after_mean"] > row["before"] for row in rows.values())
