"""What carrying the channel correlation through convolutions gains and costs (``accuracy="accurate"``).

Each network (torchvision, random weights, seed 0; N(0, 1) input) is evaluated as in
``propagation_accuracy.py`` twice: with the channel correlation carried through every convolution within
``graphnorm.rules.channel_correlation.CORRELATION_BUDGET`` (the default), and with the budget set to 0 (no
convolution carries it: channels independent after every convolution, 1x1 included). Reported: the std error
at the BatchNorm inputs (median / worst median) for both, and the propagation time of both, measured side by
side (interleaved repeats, median) so that the ratio survives a shared machine.

    python benchmarks/channel_correlation.py                              # resnet18, vgg11_bn, resnet50
    python benchmarks/channel_correlation.py --models resnet50 --cases 224:channel
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from common import announce, markdown_table, write_result
from propagation_accuracy import SAMPLES, evaluate

import graphnorm.rules.channel_correlation as channel_correlation
from graphnorm import InputStats
from graphnorm.propagate import MomentPropagator

MODELS = ("resnet18", "vgg11_bn", "resnet50")
CASES = ("224:channel", "64:unit")  # size:representation (each network's default at that size)


def _budgets() -> dict[str, int]:
    return {"with": channel_correlation.CORRELATION_BUDGET, "without": 0}


def _side_by_side_seconds(name: str, size: int, spatial: bool, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    propagator = MomentPropagator(copy.deepcopy(model), (1, 3, size, size), spatial=spatial,
                                  batch_norm="analytic", accuracy="accurate")
    stats = InputStats.standard(3)
    budgets = _budgets()
    times: dict[str, list[float]] = {label: [] for label in budgets}
    try:
        with torch.no_grad():
            for _ in range(repeats):
                for label, budget in budgets.items():
                    channel_correlation.CORRELATION_BUDGET = budget
                    start = time.perf_counter()
                    propagator.run(stats)
                    times[label].append(time.perf_counter() - start)
    finally:
        channel_correlation.CORRELATION_BUDGET = budgets["with"]
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="size:channel or size:unit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    budgets = _budgets()
    for case in args.cases:
        size, representation = case.split(":")
        size, spatial = int(size), representation == "unit"
        for name in args.models:
            row = {"model": name, "size": size, "mode": f"{'per-unit' if spatial else 'per-channel'} accurate"}
            try:
                for label, budget in budgets.items():
                    channel_correlation.CORRELATION_BUDGET = budget
                    result = evaluate(name, size, SAMPLES[size], 32, spatial, "accurate")
                    row[label] = {k: result[k] for k in ("median_error", "worst_median_error")}
            finally:
                channel_correlation.CORRELATION_BUDGET = budgets["with"]
            row["seconds"] = _side_by_side_seconds(name, size, spatial, args.repeats)
            rows.append(row)
            print(f"{name} {size} {row['mode']}: {row}", flush=True)
    path = write_result("channel_correlation", {"args": vars(args), "budget": budgets["with"], "rows": rows})
    print(markdown_table(
        ["model", "input", "mode", "error with (median / worst)", "without", "time with", "without", "ratio"],
        [[r["model"], f"{r['size']}x{r['size']}", r["mode"],
          f"{r['with']['median_error']:.3f} / {r['with']['worst_median_error']:.3f}",
          f"{r['without']['median_error']:.3f} / {r['without']['worst_median_error']:.3f}",
          f"{r['seconds']['with']:.2f} s", f"{r['seconds']['without']:.2f} s",
          f"{r['seconds']['with'] / r['seconds']['without']:.1f}x"] for r in rows]))
    announce(path)


if __name__ == "__main__":
    main()
