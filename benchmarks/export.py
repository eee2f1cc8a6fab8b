"""Convert + export + verify as a whole process, and onnxruntime latency of the exported converted model next
to the original model exported in eval mode (its BatchNorm folded), measured side by side.

    python benchmarks/export.py                      # resnet18 and resnet50 at 224x224, 3 process runs each
    python benchmarks/export.py --models resnet18 --runs 5 --latency-repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torchvision
from common import announce, interleaved_medians, write_result

import graphnorm

IMAGENET = ["--input-mean", "0.485,0.456,0.406", "--input-std", "0.229,0.224,0.225"]


PLAIN_EXPORT = """import sys, torch, torchvision
model = getattr(torchvision.models, sys.argv[1])(weights=None).eval()
torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), sys.argv[2], dynamo=True,
                  dynamic_shapes=({0: torch.export.Dim("batch")},))
"""


def whole_process(model: str, out: Path, runs: int) -> dict[str, list[float]]:
    """Process times with the default agreement check, without it (--agreement-samples 0), and of a plain
    ``torch.onnx.export(dynamo=True)`` of the original model in eval mode (no verification), interleaved."""
    command = [sys.executable, "-m", "graphnorm", "convert", f"torchvision.models:{model}", str(out),
               "--input-shape", "1,3,224,224", *IMAGENET, "--force", "-q"]
    variants = {"default": command, "no agreement check": [*command, "--agreement-samples", "0"],
                "plain torch.onnx.export": [sys.executable, "-c", PLAIN_EXPORT, model,
                                            str(out.with_name(f"{model}_plain.onnx"))]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, variant in variants.items():
            start = time.perf_counter()
            subprocess.run(variant, check=True)
            times[name].append(time.perf_counter() - start)
    return times


def latency(converted_path: Path, original_path: Path, repeats: int) -> dict[str, float]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    paths = {"converted (graphnorm)": converted_path, "original (eval BatchNorm)": original_path}
    sessions = {name: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    calls = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
    return interleaved_medians(calls, repeats, warmup=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-repeats", type=int, default=30)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            converted_path = Path(folder) / f"{name}_converted.onnx"
            times = whole_process(name, converted_path, args.runs)
            torch.manual_seed(0)
            original = getattr(torchvision.models, name)(weights=None).eval()
            original_path = Path(folder) / f"{name}_original.onnx"
            graphnorm.export_onnx(original, original_path, input_shape=(1, 3, 224, 224))
            medians = latency(converted_path, original_path, args.latency_repeats)
            ratio = medians["converted (graphnorm)"] / medians["original (eval BatchNorm)"]
            rows.append({"model": name, "process_seconds": times["default"],
                         "process_median_s": statistics.median(times["default"]),
                         "process_seconds_without_agreement": times["no agreement check"],
                         "process_median_without_agreement_s": statistics.median(times["no agreement check"]),
                         "process_seconds_plain_export": times["plain torch.onnx.export"],
                         "process_median_plain_export_s": statistics.median(times["plain torch.onnx.export"]),
                         "ort_median_ms": {k: v * 1e3 for k, v in medians.items()}, "ort_ratio": ratio})
    path = write_result("export", {"runs": args.runs, "latency_repeats": args.latency_repeats, "rows": rows})
    print("| model | convert+export+verify (process, median) | without the agreement check | plain torch.onnx.export "
          "| ratio to plain | ORT converted | ORT original | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ort = r["ort_median_ms"]
        plain = r["process_median_plain_export_s"]
        print(f"| {r['model']} | {r['process_median_s']:.1f} s | {r['process_median_without_agreement_s']:.1f} s | "
              f"{plain:.1f} s | {r['process_median_s'] / plain:.2f} | "
              f"{ort['converted (graphnorm)']:.1f} ms | {ort['original (eval BatchNorm)']:.1f} ms | "
              f"{r['ort_ratio']:.3f} |")
    announce(path)


if __name__ == "__main__":
    main()
