"""What the sampled fallback costs in a training step: timm SKResNet-18 (8 selective-kernel softmaxes, which
have no closed-form rule and are sampled), converted with K = 32, 256 (the default) and 1024 samples, beside the
original BatchNorm model, one training step each (forward + backward + SGD), timed round-robin. Also the
accuracy side: the sampled nodes' std against the K = 4096 estimate.

    python benchmarks/fallback_cost.py                  # B = 8, 64x64, 15 steps each
    python benchmarks/fallback_cost.py --batch 32 --size 96 --repeats 20
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
from common import announce, interleaved_medians, markdown_table, write_result
from train_step import step_function

import graphnorm
from graphnorm import InputStats


def sampled_std_error(model: torch.nn.Module, shape: tuple[int, ...], samples: int, reference,
                      names: list[str]) -> float:
    """Worst relative error of the sampled nodes' (``names``) per-channel std at ``samples`` against
    ``reference``."""
    table = graphnorm.propagate(model, InputStats.standard(3), shape, fallback_samples=samples)
    errors = [((table[name].std - reference[name].std).abs() / reference[name].std.clamp_min(1e-12)).max().item()
              for name in names]
    return max(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 256, 1024])
    args = parser.parse_args()
    torch.manual_seed(0)
    base = timm.create_model("skresnet18", pretrained=False, num_classes=1000)
    shape = (1, 3, args.size, args.size)
    stats = InputStats.standard(3)
    steps = {"BatchNorm": step_function(copy.deepcopy(base), args.batch, args.size)}
    sampled = 0
    for k in args.samples:
        converted = graphnorm.convert(base, stats, input_shape=shape, fallback_samples=k, agreement_samples=0)
        sampled = len(converted.graphnorm_log.sampled)
        steps[f"graphnorm analytic, K = {k}"] = step_function(converted, args.batch, args.size)
    medians = interleaved_medians(steps, args.repeats)

    propagator = graphnorm.MomentPropagator(base.eval(), shape, fallback_samples=4096)
    with torch.no_grad():
        reference = propagator.run(stats)
    rows = []
    for name, seconds in medians.items():
        k = int(name.rsplit("= ", 1)[1]) if "K =" in name else None
        with torch.no_grad():
            error = sampled_std_error(base, shape, k, reference, list(propagator.sampled)) if k is not None else None
        rows.append({"variant": name, "median_ms": seconds * 1e3,
                     "ratio_to_batchnorm": seconds / medians["BatchNorm"], "sampled_std_error_vs_k4096": error})
    path = write_result(f"fallback_cost_skresnet18_{args.size}px_batch{args.batch}",
                        {"batch": args.batch, "size": args.size, "repeats": args.repeats, "sampled_nodes": sampled,
                         "rows": rows})
    print(f"skresnet18, {sampled} sampled nodes, batch {args.batch}, {args.size}x{args.size}")
    print(markdown_table(["variant", "median step", "ratio to BatchNorm", "sampled std, worst error vs K = 4096"],
                         [[r["variant"], f"{r['median_ms']:.1f} ms", f"{r['ratio_to_batchnorm']:.2f}",
                           "-" if r["sampled_std_error_vs_k4096"] is None
                           else f"{100 * r['sampled_std_error_vs_k4096']:.2f}%"] for r in rows]))
    announce(path)


if __name__ == "__main__":
    main()
