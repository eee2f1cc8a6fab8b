"""Wall time of one training step (forward + backward + SGD step) of torchvision ResNet-18 on (B, 3, S, S):
the original BatchNorm model, graphnorm's analytic, reparam and NormProp conversions, the same network with
BatchNorm removed (the floor for any batch-independent normalizer), and the weight-based normalizers a user would
pick instead (BatchNorm removed, every conv swapped): torch ``weight_norm`` and timm ``StdConv2d`` (weight
standardization). Measured side by side, round-robin, reported as ratios to the BatchNorm step; ``--compile``
adds every variant under ``torch.compile`` (ratios to the compiled BatchNorm step). Also reported: the number of
ops the recorded statistics program runs per training step (forward, and backward nodes), each a kernel launch on
a GPU.

    python benchmarks/train_step.py                   # B in 1 8 32, 20 steps each, 32x32
    python benchmarks/train_step.py --batches 32 --size 64 --compile
    python benchmarks/train_step.py --batches 32 --repeats 40 --profile --breakdown
    python benchmarks/train_step.py --batches 32 --repeats 10 --breakdown --profile-statistics --compile
    python benchmarks/train_step.py --batches 32 --repeats 8 --compile --only BatchNorm "graphnorm analytic"
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats

import timm.layers
import torch
import torch.nn as nn
import torchvision
from common import announce, interleaved_medians, write_result

import graphnorm
from graphnorm import InputStats
from graphnorm.program import op_count


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


def with_weight_normalized_convs(model: nn.Module, kind: str) -> nn.Module:
    """BatchNorm removed and every conv weight-normalized: torch ``weight_norm`` (``g v/||v||``) or timm
    ``StdConv2d`` (weight standardization), with the original weights."""
    stripped = without_batchnorm(model)
    for name, module in list(stripped.named_modules()):
        if not isinstance(module, nn.Conv2d):
            continue
        if kind == "weight_norm":
            stripped.set_submodule(name, torch.nn.utils.parametrizations.weight_norm(module))
        else:
            swapped = timm.layers.StdConv2d(module.in_channels, module.out_channels, module.kernel_size,
                                            module.stride, module.padding, module.dilation, module.groups,
                                            bias=module.bias is not None)
            swapped.load_state_dict(module.state_dict())
            stripped.set_submodule(name, swapped)
    return stripped


def statistics_op_counts(converted: graphnorm.ConvertedModule) -> dict[str, int]:
    """Ops of one training step's statistics: the recorded program's forward ops and the autograd nodes its
    backward runs."""
    program = converted.statistics_program
    if program is None:
        return {"forward_ops": 0, "backward_nodes": 0}
    outputs = program.train()(*converted.statistics_inputs())
    seen, stack = set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    backward = sum(type(node).__name__ != "AccumulateGrad" for node in seen)
    return {"forward_ops": op_count(program.train_program), "backward_nodes": backward}


def breakdown(base: nn.Module, stats: InputStats, batch: int, size: int, repeats: int, compiled: bool = False,
              profile: bool = False) -> dict[str, float]:
    """Split one analytic training step: the statistics program (forward, forward + backward; with ``compiled``
    also the program alone under torch.compile) next to the whole step's forward + backward and BatchNorm's
    (medians, ms). ``profile`` prints torch.profiler's op table of 5 program forward + backward passes."""
    converted = graphnorm.convert(base, stats, input_shape=(1, 3, size, size), mode="analytic").train()
    program = converted.statistics_program
    inputs = converted.statistics_inputs()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    reference = copy.deepcopy(base).train()

    def program_step(run=program) -> None:
        sum(t.sum() for t in run(*inputs)).backward()

    candidates = {
        "statistics program forward": lambda: program(*inputs),
        "statistics program forward + backward": program_step,
        "analytic model forward + backward": lambda: nn.functional.cross_entropy(converted(x), y).backward(),
        "BatchNorm model forward + backward": lambda: nn.functional.cross_entropy(reference(x), y).backward(),
    }
    if compiled:
        alone = torch.compile(program.train_program)
        candidates["statistics program forward + backward, compiled alone"] = lambda: program_step(
            lambda *tensors: alone(program.input_mean, program.input_var, *tensors))
    medians = interleaved_medians(candidates, repeats)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU]) as recorded:
            for _ in range(5):
                program_step()
        print(recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return {name: seconds * 1e3 for name, seconds in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also profile one analytic step (cProfile)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also split an analytic step at the largest batch into statistics pass and graph")
    parser.add_argument("--compile", action="store_true", help="also time every variant under torch.compile")
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="time only these variants (names as in the table, e.g. BatchNorm 'graphnorm analytic')")
    parser.add_argument("--profile-statistics", action="store_true",
                        help="with --breakdown: torch.profiler's op table of the statistics program")
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
        "torch weight_norm": lambda: with_weight_normalized_convs(base, "weight_norm"),
        "timm StdConv2d": lambda: with_weight_normalized_convs(base, "std_conv"),
    }
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown or "BatchNorm" not in args.only:
            parser.error(f"--only takes BatchNorm (the reference) and any of {sorted(variants)}; got {unknown}")
        variants = {name: make for name, make in variants.items() if name in args.only}
    if args.compile:
        variants |= {f"{name}, compiled": (lambda make=make: torch.compile(make())) for name, make in variants.items()}
    op_counts = {mode: statistics_op_counts(graphnorm.convert(base, stats, input_shape=shape, mode=mode))
                 for mode in ("analytic", "reparam")}
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
            compiled = name.endswith(", compiled")
            reference = "BatchNorm, compiled" if compiled else "BatchNorm"
            floor = "no normalization, compiled" if compiled else "no normalization"
            rows.append({"batch": batch, "variant": name, "median_ms": seconds * 1e3,
                         "ratio_to_batchnorm": seconds / medians[reference] if reference in medians else None,
                         "ratio_to_no_norm": seconds / medians[floor] if floor in medians else None})
        rows += [{"batch": batch, "variant": name, "error": error} for name, error in failures.items()]
        if args.profile and batch == args.batches[-1]:
            analytic = step_function(variants["graphnorm analytic"](), batch, args.size)
            analytic()
            profiler = cProfile.Profile()
            profiler.runcall(analytic)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    split = (breakdown(base, stats, args.batches[-1], args.size, args.repeats, args.compile, args.profile_statistics)
             if args.breakdown else None)
    if split:
        print("| part of an analytic step | median |\n|---|---|")
        for name, ms in split.items():
            print(f"| {name} | {ms:.1f} ms |")
    batches = "-".join(str(b) for b in args.batches)
    suffix = ("_compile" if args.compile else "") + ("_subset" if args.only else "")
    path = write_result(f"train_step_resnet18_{args.size}px_batch{batches}{suffix}",
                        {"repeats": args.repeats, "size": args.size, "rows": rows, "breakdown_ms": split,
                         "statistics_ops_per_step": op_counts})
    for mode, counts in op_counts.items():
        print(f"{mode}: the statistics program runs {counts['forward_ops']} ops forward and "
              f"{counts['backward_nodes']} autograd nodes backward per training step")
    print("| batch | variant | median step | ratio to BatchNorm | ratio to no normalization |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['variant']} | fails: {r['error'][:60]} | | |")
            continue
        ratio = f"{r['ratio_to_batchnorm']:.2f}" if r["ratio_to_batchnorm"] is not None else "n/a"
        floor = f"{r['ratio_to_no_norm']:.2f}" if r["ratio_to_no_norm"] is not None else "n/a"
        print(f"| {r['batch']} | {r['variant']} | {r['median_ms']:.1f} ms | {ratio} | {floor} |")
    announce(path)


if __name__ == "__main__":
    main()
