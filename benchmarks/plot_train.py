"""Plot the training benchmark: test accuracy and test NLL against batch size, one line per variant, one column
per data set.

    python benchmarks/plot_train.py                 # benchmarks/results/train.json -> docs/images/train_accuracy.png
    python benchmarks/plot_train.py train_32epochs  # -> docs/images/train_32epochs_accuracy.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
STYLE = {"batchnorm": ("black", "-"), "groupnorm": ("tab:gray", "-"), "none": ("tab:gray", ":"),
         "analytic": ("tab:blue", "-"), "reparam": ("tab:cyan", "--"), "normprop": ("tab:green", "-"),
         "analytic+noise": ("tab:red", "-"), "analytic+learned": ("tab:purple", "-"),
         "layernorm": ("tab:olive", "--"), "evonorm_s0": ("tab:orange", "-"), "frn_tlu": ("tab:brown", "-")}
PANELS = (("accuracy", "test accuracy (%), mean ± std over seeds", 100), ("test_nll", "test NLL, mean ± std", 1))


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "train"
    rows = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())["rows"]
    datasets = sorted({r["dataset"] for r in rows})
    figure, axes = plt.subplots(len(PANELS), len(datasets), figsize=(6 * len(datasets), 4.5 * len(PANELS)), dpi=100,
                                squeeze=False)
    for row_axes, (metric, label, scale) in zip(axes, PANELS, strict=True):
        for axis, dataset in zip(row_axes, datasets, strict=True):
            for variant, (color, style) in STYLE.items():
                points = sorted((r["batch"], scale * r[f"{metric}_mean"], scale * r[f"{metric}_std"]) for r in rows
                                if r["dataset"] == dataset and r["variant"] == variant
                                and r.get(f"{metric}_mean") is not None)
                if points:
                    xs, ys, errs = zip(*points, strict=True)
                    axis.errorbar(xs, ys, yerr=errs, color=color, linestyle=style, marker="o", markersize=4,
                                  capsize=2, label=variant)
            axis.set_xscale("log", base=2)
            axis.set_xticks([1, 2, 4, 8, 32], labels=["1", "2", "4", "8", "32"])
            axis.set_xlabel("batch size")
            axis.set_ylabel(label)
            axis.set_title(dataset)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    target = ROOT / "docs" / "images" / ("train_accuracy.png" if name == "train" else f"{name}_accuracy.png")
    figure.savefig(target)
    print(f"written to {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
