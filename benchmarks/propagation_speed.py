"""Cost of one moment-propagation pass next to one eval forward pass, measured side by side.

    python benchmarks/propagation_speed.py                      # resnet50, per channel, (1, 3, 224, 224)
    python benchmarks/propagation_speed.py --model resnet18 --repeats 30
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from common import announce, interleaved_medians, write_result

from graphnorm import InputStats, MomentPropagator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    shape = (1, 3, args.size, args.size)
    stats = InputStats.standard(3)
    x = torch.randn(shape)
    propagator = MomentPropagator(model, shape)
    weights = sum(p.numel() for p in model.parameters())

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def moments_no_grad() -> None:
        with torch.no_grad():
            propagator.run(stats)

    def moments_with_grad() -> None:
        propagator.run(stats)

    medians = interleaved_medians({"eval forward (batch 1)": forward, "moment pass, no grad": moments_no_grad,
                                   "moment pass, recording grad": moments_with_grad}, args.repeats)
    base = medians["eval forward (batch 1)"]
    path = write_result(f"propagation_speed_{args.model}", {
        "model": args.model, "input_shape": shape, "parameters": weights, "repeats": args.repeats,
        "median_seconds": medians, "ratio_to_forward": {k: v / base for k, v in medians.items()}})
    print(f"{args.model}, {weights / 1e6:.1f}M parameters, input {shape}, median of {args.repeats}, interleaved")
    print("| pass | median time | ratio to forward |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.1f} ms | {seconds / base:.2f} |")
    announce(path)


if __name__ == "__main__":
    main()
