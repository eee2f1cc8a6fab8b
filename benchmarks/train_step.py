"""Wall time of one training step (forward + backward + SGD step) of torchvision ResNet-18 on (B, 3, 32, 32):
the original BatchNorm model, graphnorm's analytic, reparam and NormProp conversions, and the same network with
BatchNorm removed (the floor for any batch-independent normalizer). Measured side by side, round-robin, and
reported as ratios to the BatchNorm step.

    python benchmarks/train_step.py                   # B in 1 8 32, 20 steps each
    python benchmarks/train_step.py --batches 32 --repeats 40 --profile
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats

import torch
import torch.nn as nn
import torchvision
from common import announce, interleaved_medians, write_result

import graphnorm
from graphnorm import InputStats


def without_batchnorm(model: nn.Module) -> nn.Module:
    stripped = copy.deepcopy(model)
    for name, module in list(stripped.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            stripped.set_submodule(name, nn.Identity())
    return stripped


def step_function(model: nn.Module, batch: int, size: int = 32):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(0, 1000, (batch,), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def breakdown(base: nn.Module, stats: InputStats, batch: int, size: int, repeats: int) -> dict[str, float]:
    """Split one analytic training step: the statistics pass (forward, forward + backward) and the graph with
    the statistics detached, next to BatchNorm's forward + backward (medians, ms)."""
    converted = graphnorm.convert(base, stats, input_shape=(1, 3, size, size), mode="analytic").train()
    state = converted.__dict__["_graphnorm_state"]
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    reference = copy.deepcopy(base).train()

    def statistics_backward() -> None:
        state.refresh(converted)
        sum(s.sum() for name, _ in state.analytic_sites for s in converted.get_submodule(name).statistics).backward()

    def graph_only() -> None:
        state.refresh(converted)
        for name, _ in state.analytic_sites:
            module = converted.get_submodule(name)
            module.statistics = tuple(s.detach() for s in module.statistics)
        out = torch.fx.GraphModule.__call__(converted, x)  # skip the automatic refresh
        nn.functional.cross_entropy(out, y).backward()

    medians = interleaved_medians({
        "statistics pass forward": lambda: state.refresh(converted),
        "statistics pass forward + backward": statistics_backward,
        "graph forward + backward, statistics detached (includes one pass forward)": graph_only,
        "BatchNorm model forward + backward": lambda: nn.functional.cross_entropy(reference(x), y).backward(),
    }, repeats)
    return {name: seconds * 1e3 for name, seconds in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also profile one analytic step (cProfile)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also split an analytic step at the largest batch into statistics pass and graph")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None)
    stats = InputStats.standard(3)
    shape = (1, 3, args.size, args.size)
    variants = {
        "BatchNorm": lambda: copy.deepcopy(base),
        "graphnorm analytic": lambda: graphnorm.convert(base, stats, input_shape=shape, mode="analytic"),
        "graphnorm reparam": lambda: graphnorm.convert(base, stats, input_shape=shape, mode="reparam"),
        "graphnorm normprop": lambda: graphnorm.convert(base, stats, input_shape=shape, mode="normprop"),
        "no normalization": lambda: without_batchnorm(base),
    }
    rows = []
    for batch in args.batches:
        steps, failures = {}, {}
        for name, make in variants.items():
            step = step_function(make(), batch, args.size)
            try:
                step()
            except (RuntimeError, ValueError) as err:  # BatchNorm cannot train on one value per channel
                failures[name] = str(err).splitlines()[0]
                continue
            steps[name] = step
        medians = interleaved_medians(steps, args.repeats)
        for name, seconds in medians.items():
            rows.append({"batch": batch, "variant": name, "median_ms": seconds * 1e3,
                         "ratio_to_batchnorm": seconds / medians["BatchNorm"] if "BatchNorm" in medians else None,
                         "ratio_to_no_norm": seconds / medians["no normalization"]})
        rows += [{"batch": batch, "variant": name, "error": error} for name, error in failures.items()]
        if args.profile and batch == args.batches[-1]:
            analytic = step_function(variants["graphnorm analytic"](), batch, args.size)
            analytic()
            profiler = cProfile.Profile()
            profiler.runcall(analytic)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    split = breakdown(base, stats, args.batches[-1], args.size, args.repeats) if args.breakdown else None
    if split:
        print("| part of an analytic step | median |\n|---|---|")
        for name, ms in split.items():
            print(f"| {name} | {ms:.1f} ms |")
    batches = "-".join(str(b) for b in args.batches)
    path = write_result(f"train_step_resnet18_{args.size}px_batch{batches}",
                        {"repeats": args.repeats, "size": args.size, "rows": rows, "breakdown_ms": split})
    print("| batch | variant | median step | ratio to BatchNorm | ratio to no normalization |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['variant']} | fails: {r['error'][:60]} | | |")
            continue
        ratio = f"{r['ratio_to_batchnorm']:.2f}" if r["ratio_to_batchnorm"] is not None else "n/a"
        print(f"| {r['batch']} | {r['variant']} | {r['median_ms']:.1f} ms | {ratio} | {r['ratio_to_no_norm']:.2f} |")
    announce(path)


if __name__ == "__main__":
    main()
