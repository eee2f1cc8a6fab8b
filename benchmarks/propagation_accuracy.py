"""Accuracy of analytic moment propagation on torchvision networks at initialization.

For each network, every BatchNorm is recalibrated to the analytic statistics (data-free), then the analytic
per-channel std at every BatchNorm input is compared with the std measured on Gaussian inputs. Reported per
network and mode: the median over BatchNorm inputs of the per-channel median relative error, the worst such
median, and the worst single channel.

    python benchmarks/propagation_accuracy.py            # 64x64, 256 samples (about 2 minutes)
    python benchmarks/propagation_accuracy.py --size 224 --models resnet18
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from common import announce, markdown_table, write_result

from graphnorm import InputStats
from graphnorm.compare import compare_batchnorm_inputs


def evaluate(name: str, size: int, samples: int, batch: int, spatial: bool) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    stats = InputStats.standard(3)
    generator = torch.Generator().manual_seed(1)
    batches = (stats.sample((batch, 3, size, size), generator=generator) for _ in range(samples // batch))
    start = time.perf_counter()
    comparisons = compare_batchnorm_inputs(model, stats, (1, 3, size, size), batches, spatial=spatial)
    medians = torch.stack([c.relative_error.median() for c in comparisons])
    worst_channel = max(c.relative_error.max().item() for c in comparisons)
    ratio = torch.cat([c.analytic / c.measured for c in comparisons])
    return {
        "model": name, "size": size, "samples": samples, "mode": "per-unit" if spatial else "per-channel",
        "batchnorm_inputs": len(comparisons),
        "median_error": medians.median().item(), "worst_median_error": medians.max().item(),
        "worst_channel_error": worst_channel,
        "analytic_over_measured_median": ratio.median().item(),
        "per_batchnorm_median_error": {c.node: round(m.item(), 4) for c, m in zip(comparisons, medians, strict=True)},
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg11_bn", "mobilenet_v2"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    rows = [evaluate(name, args.size, args.samples, args.batch, spatial)
            for name in args.models for spatial in (False, True)]
    path = write_result(f"propagation_accuracy_{args.size}", {"rows": rows})
    headers = ["model", "input", "mode", "BN inputs", "median error", "worst median", "worst channel",
               "analytic/measured"]
    print(markdown_table(headers, [[r["model"], f"{r['size']}x{r['size']}", r["mode"], str(r["batchnorm_inputs"])]
                                   + [f"{r[k]:.3f}" for k in ("median_error", "worst_median_error",
                                                              "worst_channel_error", "analytic_over_measured_median")]
                                   for r in rows]))
    announce(path)

if __name__ == "__main__":
    main()
