"""`graphnorm.inspect` summaries on torchvision networks at initialization and on the bundled digits CNN with
the real digits data, plus the signal-propagation plot of ResNet-18 used in docs/inspect.md.

    python benchmarks/inspect_models.py            # about 3 minutes
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from common import announce, markdown_table, write_result
from sklearn.datasets import load_digits

import graphnorm
from graphnorm.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


def summary_row(name: str, data: str, report: graphnorm.Report) -> dict:
    return {"model": name, "data": data, "normalize": report.normalize,
            "mode": "per-unit" if report.spatial else "per-channel", "samples": report.samples, **report.summary}


def main() -> None:
    rows = []
    for name in ("resnet18", "vgg11_bn", "mobilenet_v2"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        for spatial in (False, True):
            report = graphnorm.inspect(model, graphnorm.InputStats.standard(3), input_shape=(1, 3, 64, 64),
                                       samples=512, spatial=spatial, normalize="analytic", progress=False)
            rows.append(summary_row(name, "N(0, 1), 64x64", report))
            if name == "resnet18" and spatial:
                report.plot(ROOT / "docs" / "images" / "inspect_resnet18.png")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    loaded = load_model(os.fspath(ROOT / "fixtures" / "digits_cnn.pt"))
    stats = graphnorm.InputStats(loaded.defaults["input_mean"], loaded.defaults["input_std"])
    for normalize in ("as-is", "analytic"):
        for spatial in (False, True):
            report = graphnorm.inspect(loaded.model, stats, input_shape=(1, 1, 8, 8), data=images, spatial=spatial,
                                       normalize=normalize, progress=False)
            rows.append(summary_row("digits CNN (trained)", "sklearn digits, 1797 images", report))
    path = write_result("inspect_models", {"rows": rows})
    headers = ["model", "data", "normalize", "mode", "samples", "BN inputs", "std error median", "worst",
               "mean error median", "worst"]
    print(markdown_table(headers, [[r["model"], r["data"], r["normalize"], r["mode"], str(r["samples"]),
                                    str(r["batchnorm_inputs"])] + [f"{r[k]:.3f}" for k in (
                                        "std_error_median", "std_error_worst", "mean_error_median",
                                        "mean_error_worst")] for r in rows]))
    announce(path)

if __name__ == "__main__":
    main()
