"""Shared plumbing of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("GRAPHNORM_RESULTS", Path(__file__).resolve().parent / "results"))


def machine() -> dict[str, object]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def interleaved_medians(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
                        ) -> dict[str, float]:
    """Median wall time (s) of each callable, timed round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (the format docs/benchmarks.md uses)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def announce(path: Path) -> None:
    print(f"\nwritten to {path}")


@dataclass
class GridRun:
    """One run of a training grid: what a training benchmark's runs have in common."""

    dataset: str
    variant: str
    batch: int
    seed: int
    epochs: float
    base_lr: float


def grid_parser(description: str, *, variants: Sequence[str], batches: Sequence[int], quick: str
                ) -> argparse.ArgumentParser:
    """The options every training grid shares: --quick, --datasets, --variants, --batches, --seeds, --workers."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"])
    parser.add_argument("--variants", nargs="+", default=list(variants))
    parser.add_argument("--batches", type=int, nargs="+", default=list(batches))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    return parser


def run_grid(function: Callable[[object], dict], jobs: list, workers: int) -> list[dict]:
    """``function`` over ``jobs``, in ``workers`` spawned processes when more than one."""
    if workers <= 1:
        return [function(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(function, jobs, chunksize=1)


def failures(runs: list[dict]) -> dict[str, object]:
    """How many runs of a group failed, and the distinct errors."""
    return {"failed": sum(r["error"] is not None for r in runs),
            "errors": sorted({r["error"] for r in runs if r["error"]})}
