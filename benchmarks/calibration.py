"""Does a conversion keep what a trained model learned? Eval accuracy of the converted digits CNN right after
conversion, and its agreement with the original, on the 1797 sklearn digits, for every mode and calibration.

    python benchmarks/calibration.py

The original is ``fixtures/digits_cnn.pt`` (trained with BatchNorm); the input statistics are measured on the
digits themselves; ``calibrate="data"`` measures on the same 1797 digits.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import markdown_table, write_result
from sklearn.datasets import load_digits

import graphnorm
from graphnorm.loading import load_model

CHECKPOINT = Path(__file__).resolve().parent.parent / "fixtures" / "digits_cnn.pt"
MODES = ("analytic", "reparam", "normprop", "fixed")
CALIBRATIONS = ("none", "auto", "data")


def main() -> None:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    model = load_model(str(CHECKPOINT)).model.eval()
    stats = graphnorm.InputStats.from_data(images)
    rows, start = [], time.perf_counter()
    for mode in MODES:
        for calibrate in CALIBRATIONS:
            for spatial in (False, True):
                converted = graphnorm.convert(model, stats, input_shape=(1, 1, 8, 8), mode=mode, spatial=spatial,
                                              calibrate=calibrate, data=images, labels=labels)
                log = converted.graphnorm_log
                rows.append({"mode": mode, "calibrate": calibrate, "applied": log.calibration, "spatial": spatial,
                             **log.agreement.to_dict()})
    path = write_result("calibration", {"seconds": time.perf_counter() - start, "rows": rows})
    print(f"original: {100 * rows[0]['accuracy_original']:.2f}% on {rows[0]['samples']} digits\n")
    print(markdown_table(
        ["mode", "calibrate", "statistics", "accuracy", "top-1 agreement", "relative logit error (median / max)"],
        [[r["mode"], r["calibrate"] + (" (→ none)" if r["calibrate"] == "auto" and r["applied"] == "none" else ""),
          "per unit" if r["spatial"] else "per channel", f"{100 * r['accuracy_converted']:.2f}%",
          f"{100 * r['top1']:.2f}%", f"{r['median_relative_error']:.2g} / {r['max_relative_error']:.2g}"]
         for r in rows]))
    print(f"\nwritten to {path.name}")


if __name__ == "__main__":
    main()
