"""Accuracy of analytic moment propagation: torchvision networks at initialization, and the trained digits CNN
on the real digits.

Torchvision networks (random weights, seed 0; N(0, 1) input): every BatchNorm is set to the analytic statistics
of its input (data-free recalibration, what ``fixed`` mode does), then the analytic per-channel std at every
BatchNorm input is compared with the std measured on drawn inputs, per channel and per unit, each in the
fast (Gaussian) and the accurate (third-cumulant) propagation. Reported per network, size and mode: the
median over BatchNorm inputs of the per-channel median relative error,
the worst such median, the median analytic/measured ratio, the noise floor of the measurement (the same
statistic between the two halves of the samples, divided by 2: what sampling alone contributes), and the
propagation time relative to per-channel propagation.

Digits CNN (graphnorm's bundled fixture, trained; the 1797 sklearn digits): ``graphnorm.inspect`` with the
BatchNorms as trained, from per-channel input statistics, per-position maps, and per-position maps with the
3x3 patch correlation; std error and mean error (in measured std) at the BatchNorm inputs; and the test of
what the statistics are for: the accuracy of ``convert(mode="fixed", calibrate="none")``, every BatchNorm
recalibrated from the analytic statistics alone (data-free), against the original's.

    python benchmarks/propagation_accuracy.py                    # everything in one file (about 40 minutes)
    python benchmarks/propagation_accuracy.py --no-digits        # the torchvision networks only
    python benchmarks/propagation_accuracy.py --sizes 64 --models resnet18 --no-digits
    python benchmarks/propagation_accuracy.py --sizes --models   # the digits CNN only (..._digits.json)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
import torchvision
from common import announce, markdown_table, write_result
from sklearn.datasets import load_digits

import graphnorm
from graphnorm import InputStats
from graphnorm.loading import load_model
from graphnorm.measure import analytic_batchnorm_statistics, measure
from graphnorm.propagate import MomentPropagator, auto_spatial

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "efficientnet_b0")
SAMPLES = {64: 1024, 224: 128}
MODES = [(spatial, accuracy) for spatial in (False, True) for accuracy in ("fast", "accurate")]


def _median_errors(analytic: dict[str, torch.Tensor], measured: dict[str, torch.Tensor]) -> list[float]:
    return [((analytic[n] - measured[n]).abs() / measured[n]).median().item() for n in analytic]


def _pooled_std(first, second) -> torch.Tensor:
    """Std of the union of two equal-size halves from their accumulators."""
    mean = (first.mean + second.mean) / 2
    return ((first.var + second.var) / 2 + (first.mean - mean).square()).sqrt()


def _propagation_seconds(propagator: MomentPropagator, stats: InputStats, repeats: int = 3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            propagator.run(stats)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(name: str, size: int, samples: int, batch: int, spatial: bool, accuracy: str) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    stats = InputStats.standard(3)
    propagator = MomentPropagator(copy.deepcopy(model), (1, 3, size, size), spatial=spatial, batch_norm="analytic",
                                  accuracy=accuracy)
    with torch.no_grad():
        table = propagator.run(stats)
    graph_module = propagator.graph_module
    inputs = [n.args[0].name for n in graph_module.graph.nodes if n.meta.get("graphnorm.op") == "batch_norm"]
    overrides = analytic_batchnorm_statistics(graph_module, table)
    generator = torch.Generator().manual_seed(1)
    batches = [stats.sample((batch, 3, size, size), generator=generator) for _ in range(samples // batch)]
    half = len(batches) // 2
    start = time.perf_counter()
    first = measure(graph_module, batches[:half], inputs, batchnorm_statistics=overrides)
    second = measure(graph_module, batches[half:], inputs, batchnorm_statistics=overrides)
    measure_seconds = time.perf_counter() - start
    analytic = {n: table[n].std.double() for n in inputs}
    measured = {n: _pooled_std(first[n], second[n]) for n in inputs}
    medians = _median_errors(analytic, measured)
    halves = _median_errors({n: first[n].var.sqrt() for n in inputs}, {n: second[n].var.sqrt() for n in inputs})
    ratio = torch.cat([analytic[n] / measured[n] for n in inputs])
    return {
        "model": name, "size": size, "samples": samples,
        "mode": ("per-unit" if spatial else "per-channel") + f" {accuracy}",
        "auto_mode": ("per-unit" if auto_spatial((1, 3, size, size), stats) else "per-channel") + " accurate",
        "batchnorm_inputs": len(inputs), "median_error": statistics.median(medians), "worst_median_error": max(medians),
        "analytic_over_measured_median": ratio.median().item(),
        "noise_floor": statistics.median(halves) / 2,
        "propagation_seconds": _propagation_seconds(propagator, stats),
        "measure_seconds": round(measure_seconds, 1),
        "per_batchnorm_median_error": {n: round(m, 4) for n, m in zip(inputs, medians, strict=True)},
    }


def digits_rows() -> list[dict]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    loaded = load_model(os.fspath(ROOT / "fixtures" / "digits_cnn.pt"))

    def top1(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return (model.eval()(images).argmax(1) == labels).float().mean().item()

    descriptions = {"per channel": InputStats.from_data(images),
                    "per position": InputStats.from_data(images, per_position=True),
                    "per position + 3x3 correlation": InputStats.from_data(images, per_position=True,
                                                                            patch_covariance=3)}
    rows = []
    for input_statistics, stats in descriptions.items():
        for spatial, accuracy in MODES:
            report = graphnorm.inspect(loaded.model, stats, input_shape=(1, 1, 8, 8), data=images, spatial=spatial,
                                       progress=False, accuracy=accuracy)
            fixed = graphnorm.convert(loaded.model, stats, input_shape=(1, 1, 8, 8), mode="fixed", spatial=spatial,
                                      calibrate="none", agreement_samples=0, accuracy=accuracy)
            rows.append({"model": "digits CNN (trained)", "data": "sklearn digits, 1797 images",
                         "input_statistics": input_statistics,
                         "mode": ("per-unit" if spatial else "per-channel") + f" {accuracy}",
                         **report.summary, "fixed_accuracy": top1(fixed),
                         "original_accuracy": top1(loaded.model)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 224])
    parser.add_argument("--samples", type=int, help="inputs drawn per network (default: 1024 at 64, 256 at 224)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-digits", action="store_true")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        for name in args.models:
            for spatial, accuracy in MODES:
                rows.append(evaluate(name, size, args.samples or SAMPLES.get(size, 256), args.batch, spatial,
                                     accuracy))
                print(f"{name} {size} {rows[-1]['mode']}: median {rows[-1]['median_error']:.3f} worst "
                      f"{rows[-1]['worst_median_error']:.3f}", flush=True)
    for row in rows:
        base = next(r for r in rows
                    if (r["model"], r["size"], r["mode"]) == (row["model"], row["size"], "per-channel fast"))
        row["time_vs_per_channel"] = row["propagation_seconds"] / base["propagation_seconds"]
    digits = [] if args.no_digits else digits_rows()
    name = "propagation_accuracy" if rows else "propagation_accuracy_digits"
    path = write_result(name, {"args": vars(args), "rows": rows, "digits": digits})
    headers = ["model", "input", "mode", "default", "BN inputs", "median error", "worst median", "analytic/measured",
               "noise floor", "propagation time vs per-channel"]
    print(markdown_table(headers, [
        [r["model"], f"{r['size']}x{r['size']}", r["mode"], "yes" if r["mode"] == r["auto_mode"] else "",
         str(r["batchnorm_inputs"]), f"{r['median_error']:.3f}", f"{r['worst_median_error']:.3f}",
         f"{r['analytic_over_measured_median']:.3f}", f"{r['noise_floor']:.3f}", f"{r['time_vs_per_channel']:.1f}x"]
        for r in rows]))
    if digits:
        print()
        print(markdown_table(
            ["model", "input statistics", "mode", "std error median", "worst", "mean error median", "worst",
             "fixed mode accuracy %, data-free", "original %"],
            [[r["model"], r["input_statistics"], r["mode"]] + [f"{r[k]:.3f}" for k in (
                "std_error_median", "std_error_worst", "mean_error_median", "mean_error_worst")]
             + [f"{100 * r['fixed_accuracy']:.1f}", f"{100 * r['original_accuracy']:.1f}"] for r in digits]))
    announce(path)


if __name__ == "__main__":
    main()
