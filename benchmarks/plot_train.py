"""Plot the training benchmark: test accuracy against batch size, one line per variant, one panel per data set.

    python benchmarks/plot_train.py   # benchmarks/results/train.json -> docs/images/train_accuracy.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
STYLE = {"batchnorm": ("black", "-"), "groupnorm": ("tab:gray", "-"), "none": ("tab:gray", ":"),
         "analytic": ("tab:blue", "-"), "reparam": ("tab:cyan", "--"), "normprop": ("tab:green", "-"),
         "analytic+noise": ("tab:red", "-")}


def main() -> None:
    rows = json.loads((ROOT / "benchmarks" / "results" / "train.json").read_text())["rows"]
    datasets = sorted({r["dataset"] for r in rows})
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), dpi=100, squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        for variant, (color, style) in STYLE.items():
            points = sorted((r["batch"], 100 * r["accuracy_mean"], 100 * r["accuracy_std"]) for r in rows
                            if r["dataset"] == dataset and r["variant"] == variant and r["accuracy_mean"] is not None)
            if points:
                xs, ys, errs = zip(*points, strict=True)
                axis.errorbar(xs, ys, yerr=errs, color=color, linestyle=style, marker="o", markersize=4,
                              capsize=2, label=variant)
        axis.set_xscale("log", base=2)
        axis.set_xticks([1, 2, 4, 8, 32], labels=["1", "2", "4", "8", "32"])
        axis.set_xlabel("batch size")
        axis.set_ylabel("test accuracy (%), mean ± std over seeds")
        axis.set_title(dataset)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    target = ROOT / "docs" / "images" / "train_accuracy.png"
    figure.savefig(target)
    print(f"written to {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
