"""Analytic statistics of a torchvision ResNet-18 at initialization, next to measured ones.

Every BatchNorm is recalibrated to the analytic statistics of its input (no data needed), then the std that
graphnorm predicts at each BatchNorm input is printed beside the std measured on 256 Gaussian inputs.

    python examples/propagate_resnet18.py [--size 64] [--per-channel]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from rich.console import Console
from rich.table import Table

from graphnorm import InputStats
from graphnorm.compare import compare_batchnorm_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--per-channel", action="store_true",
                        help="per-channel moments (ignore zero padding; default: per unit, exact at borders)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    stats = InputStats.standard(3)
    generator = torch.Generator().manual_seed(1)
    batches = (stats.sample((32, 3, args.size, args.size), generator=generator) for _ in range(8))
    comparisons = compare_batchnorm_inputs(model, stats, (1, 3, args.size, args.size), batches,
                                           spatial=not args.per_channel)

    mode = "per channel" if args.per_channel else "per unit"
    table = Table(title=f"ResNet-18 at init, input N(0, 1) {args.size}x{args.size}, {mode}: std at BatchNorm inputs")
    for column in ("BatchNorm input", "analytic std", "measured std", "median rel. error", "worst channel"):
        table.add_column(column, justify="left" if column == "BatchNorm input" else "right", no_wrap=True)
    for c in comparisons:
        table.add_row(c.node, f"{c.analytic.mean():.4f}", f"{c.measured.mean():.4f}",
                      f"{c.relative_error.median():.3f}", f"{c.relative_error.max():.3f}")
    console = Console(width=110)
    console.print(table)
    medians = torch.stack([c.relative_error.median() for c in comparisons])
    console.print(f"median over BatchNorm inputs: {medians.median():.3f}, worst: {medians.max():.3f}")


if __name__ == "__main__":
    main()
