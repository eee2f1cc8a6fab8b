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
from dataclasses import asdict, dataclass, is_dataclass
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


def _keyed_call(task: tuple[Callable[[object], dict], str, object]) -> tuple[str, dict]:
    function, key, job = task
    return key, function(job)


def run_grid(function: Callable[[object], dict], jobs: list, workers: int, journal: Path | None = None
             ) -> list[dict]:
    """``function`` over ``jobs``, in ``workers`` spawned processes when more than one.

    With a ``journal`` (a JSON-lines file), every finished job is appended to it as it finishes, and jobs
    already recorded there by an earlier, interrupted call with the same jobs are not run again: a grid of
    hours resumes where it stopped. The journal is removed once the whole grid is done.
    """
    done: dict[str, dict] = {}
    if journal is not None and journal.exists():
        for line in journal.read_text().splitlines():
            entry = json.loads(line) if line.strip() else None
            if entry:
                done[entry["job"]] = entry["result"]
    keys = [json.dumps(asdict(job), sort_keys=True) if is_dataclass(job) else repr(job) for job in jobs]
    todo = [(key, job) for key, job in zip(keys, jobs, strict=True) if key not in done]
    if done:
        print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} runs already in {journal}")

    def record(key: str, result: dict) -> None:
        done[key] = result
        if journal is not None:
            with open(journal, "a") as out:
                out.write(json.dumps({"job": key, "result": result}) + "\n")

    if workers <= 1:
        for key, job in todo:
            record(key, function(job))
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            tasks = [(function, key, job) for key, job in todo]
            for key, result in pool.imap_unordered(_keyed_call, tasks, chunksize=1):
                record(key, result)
    if journal is not None:
        journal.unlink(missing_ok=True)
    return [done[key] for key in keys]


def failures(runs: list[dict]) -> dict[str, object]:
    """How many runs of a group failed, and the distinct errors."""
    return {"failed": sum(r["error"] is not None for r in runs),
            "errors": sorted({r["error"] for r in runs if r["error"]})}
