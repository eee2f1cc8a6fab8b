"""Wall time of one training step (forward + backward + SGD step with momentum) at the batch sizes graphnorm is
for, on torchvision ResNet-18 (and MobileNetV2, EfficientNet-B0 with ``--models``), 10 classes, on (B, 3, S, S):
the original BatchNorm model, graphnorm's analytic, reparam and NormProp conversions, and what a user who trains
with tiny batches picks instead: GroupNorm(32) in place of every BatchNorm (groups reduced to divide the
channels where 32 does not), torchvision ``FrozenBatchNorm2d`` (BatchNorm with frozen statistics and affine),
torch ``weight_norm`` on every conv with BatchNorm removed, and the same network without normalization (the
floor of any batch-independent normalizer). Measured side by side, round-robin, in one run, as ratios to the
BatchNorm step; ``--compile`` adds every variant under ``torch.compile`` (ratios to the compiled BatchNorm step)
and the time of its first compiled step, with a fresh compiler cache. Also reported per graphnorm mode: the
ops of the recorded statistics program (``graphnorm_log.statistics``) and the ATen ops one step's statistics
dispatch, forward and backward (each a kernel launch on a GPU).

    python benchmarks/train_step.py --batch 1,2,8 --size 64
    python benchmarks/train_step.py --batch 1,2,8 --size 128 --repeats 10
    python benchmarks/train_step.py --batch 1,8 --size 64 --compile --repeats 8
    python benchmarks/train_step.py --models mobilenet_v2 efficientnet_b0 --batch 1,2,8 --size 64
    python benchmarks/train_step.py --batch 32 --size 32 --only BatchNorm "graphnorm analytic" --breakdown
    python benchmarks/train_step.py --batch 1 --only "graphnorm analytic" --profile "graphnorm analytic"
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time

import torch
import torch.nn as nn
import torchvision
from common import announce, interleaved_medians, markdown_table, write_result
from torchvision.ops.misc import FrozenBatchNorm2d

import graphnorm
from graphnorm import InputStats
from graphnorm.program import dispatched_ops

MODELS = {"resnet18": torchvision.models.resnet18, "mobilenet_v2": torchvision.models.mobilenet_v2,
          "efficientnet_b0": torchvision.models.efficientnet_b0}
MODES = ("analytic", "reparam", "normprop")


def _swap_batchnorms(model: nn.Module, make) -> nn.Module:
    """A copy with every BatchNorm2d replaced by ``make(batchnorm)``."""
    swapped = copy.deepcopy(model)
    for name, module in list(swapped.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            swapped.set_submodule(name, make(module))
    return swapped


def _group_norm(batchnorm: nn.BatchNorm2d) -> nn.GroupNorm:
    channels = batchnorm.num_features
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _frozen(batchnorm: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(batchnorm.num_features, eps=batchnorm.eps)
    frozen.load_state_dict({k: v for k, v in batchnorm.state_dict().items() if k != "num_batches_tracked"})
    return frozen


def _weight_normalized(model: nn.Module) -> nn.Module:
    """BatchNorm removed and every conv weight-normalized with torch ``weight_norm`` (``g v/||v||``)."""
    stripped = _swap_batchnorms(model, lambda _: nn.Identity())
    for name, module in list(stripped.named_modules()):
        if isinstance(module, nn.Conv2d):
            stripped.set_submodule(name, torch.nn.utils.parametrizations.weight_norm(module))
    return stripped


def variants(base: nn.Module, size: int) -> dict:
    stats, shape = InputStats.standard(3), (1, 3, size, size)
    made = {"BatchNorm": lambda: copy.deepcopy(base),
            "GroupNorm(32)": lambda: _swap_batchnorms(base, _group_norm),
            "FrozenBatchNorm2d": lambda: _swap_batchnorms(base, _frozen),
            "weight_norm, no BN": lambda: _weight_normalized(base),
            "no normalization": lambda: _swap_batchnorms(base, lambda _: nn.Identity())}
    for mode in MODES:
        made[f"graphnorm {mode}"] = lambda mode=mode: graphnorm.convert(base, stats, input_shape=shape, mode=mode,
                                                                        agreement_samples=0)
    return made


def step_function(model: nn.Module, batch: int, size: int, classes: int = 10):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def statistics_counts(base: nn.Module, size: int) -> dict[str, dict]:
    """Per mode: the recorded program's ops and the ATen ops one step's statistics dispatch."""
    counts = {}
    for mode in MODES:
        converted = graphnorm.convert(base, InputStats.standard(3), input_shape=(1, 3, size, size), mode=mode,
                                      agreement_samples=0)
        program = converted.statistics_program
        summary = converted.graphnorm_log.statistics
        counts[mode] = {"program_ops": 0 if summary is None else summary.ops,
                        "fused": 0 if summary is None else summary.fused,
                        "dispatched": ({"forward": 0, "backward": 0} if program is None
                                       else dispatched_ops(program, converted.statistics_inputs())),
                        "log": "" if summary is None else str(summary)}
    return counts


def breakdown(base: nn.Module, batch: int, size: int, repeats: int) -> dict[str, float]:
    """Split an analytic step: the statistics program forward, forward + backward, the whole step's forward +
    backward and BatchNorm's (medians, ms)."""
    converted = graphnorm.convert(base, InputStats.standard(3), input_shape=(1, 3, size, size), mode="analytic",
                                  agreement_samples=0).train()
    program, inputs = converted.statistics_program, converted.statistics_inputs()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    reference = copy.deepcopy(base).train()

    def program_step() -> None:
        torch.autograd.grad(sum(t.sum() for t in program(*inputs)), inputs, allow_unused=True)

    candidates = {"statistics program forward": lambda: program(*inputs),
                  "statistics program forward + backward": program_step,
                  "analytic model forward + backward": lambda: nn.functional.cross_entropy(converted(x), y).backward(),
                  "BatchNorm model forward + backward": lambda: nn.functional.cross_entropy(reference(x), y).backward()}
    return {name: seconds * 1e3 for name, seconds in interleaved_medians(candidates, repeats).items()}


def profile(step, rows: int = 20) -> str:
    """The ops of a few steps by self CPU time (torch.profiler), after a warm-up step."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(3):
            step()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _timed_first_step(step) -> tuple[float | None, str | None]:
    start = time.perf_counter()
    try:
        step()
    except (RuntimeError, ValueError) as err:  # BatchNorm cannot train on one value per channel
        return None, str(err).splitlines()[0]
    return time.perf_counter() - start, None


def run_model(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base = MODELS[name](weights=None, num_classes=10)
    made = variants(base, args.size)
    if args.only:
        made = {variant: make for variant, make in made.items() if variant in args.only}
    rows, first_steps = [], {}
    for batch in args.batch:
        steps, failures = {}, {}
        for variant, make in made.items():
            for compiled in (False, True) if args.compile else (False,):
                label = f"{variant}, compiled" if compiled else variant
                model = make()
                if compiled:  # a first compiled step from scratch: a fresh compiler cache
                    torch._dynamo.reset()
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="graphnorm-inductor-")
                step = step_function(torch.compile(model) if compiled else model, batch, args.size)
                seconds, error = _timed_first_step(step)
                if error is not None:
                    failures[label] = error
                    continue
                if compiled:
                    first_steps.setdefault(variant, {})[batch] = seconds
                steps[label] = step
        medians = interleaved_medians(steps, args.repeats)
        for label, seconds in medians.items():
            compiled = label.endswith(", compiled")
            reference, floor = ("BatchNorm, compiled", "no normalization, compiled") if compiled else (
                "BatchNorm", "no normalization")
            rows.append({"batch": batch, "variant": label, "median_ms": seconds * 1e3,
                         "ratio_to_batchnorm": seconds / medians[reference] if reference in medians else None,
                         "ratio_to_no_norm": seconds / medians[floor] if floor in medians else None})
        rows += [{"batch": batch, "variant": label, "error": error} for label, error in failures.items()]
        if args.profile in steps:
            print(f"\n{name}, {args.profile}, B={batch}, {args.size}x{args.size}, three steps:\n"
                  + profile(steps[args.profile]))
    return {"model": name, "rows": rows, "first_compiled_step_s": first_steps,
            "statistics": statistics_counts(base, args.size),
            "breakdown_ms": breakdown(base, args.batch[-1], args.size, args.repeats) if args.breakdown else None}


def _table(result: dict, batches: list[int]) -> str:
    cells: dict[str, dict[int, str]] = {}
    for row in result["rows"]:
        text = "fails" if "error" in row else f"{row['ratio_to_batchnorm']:.2f}" if row["ratio_to_batchnorm"] else "n/a"
        cells.setdefault(row["variant"], {})[row["batch"]] = text
    bn = {row["batch"]: f"{row['median_ms']:.1f} ms" for row in result["rows"]
          if row["variant"] == "BatchNorm" and "error" not in row}
    lines = [["BatchNorm step (ms)", *(bn.get(b, "fails") for b in batches)]]
    lines += [[variant, *(by_batch.get(b, "") for b in batches)] for variant, by_batch in cells.items()]
    return markdown_table(["variant (ratio to the BatchNorm step)", *(f"B={b}" for b in batches)], lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", "--batches", type=lambda text: [int(b) for b in text.split(",")],
                        default=[1, 2, 8], help="batch sizes, comma-separated (default 1,2,8)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also every variant under torch.compile")
    parser.add_argument("--breakdown", action="store_true", help="also split an analytic step (largest batch)")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="time only these variants (names as printed; "
                        "BatchNorm is the reference and always kept)")
    parser.add_argument("--profile", metavar="VARIANT", help="also print the ops of this variant's step by self CPU "
                        "time (torch.profiler), at every batch size")
    parser.add_argument("--quick", action="store_true", help="a small run (ResNet-18, 32x32, B=2, 2 repeats)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.batch, args.repeats = ["resnet18"], 32, [2], 2
    if args.only:
        args.only = {"BatchNorm", *args.only}
    results = [run_model(name, args) for name in args.models]
    batches = "-".join(str(b) for b in args.batch)
    suffix = ("_compile" if args.compile else "") + ("_subset" if args.only else "")
    models = "-".join(args.models)
    name = "train_step_quick" if args.quick else f"train_step_{models}_{args.size}px_batch{batches}{suffix}"
    path = write_result(name,
                        {"repeats": args.repeats, "size": args.size, "batches": args.batch, "results": results})
    for result in results:
        print(f"\n{result['model']}, {args.size}x{args.size}:\n")
        print(_table(result, args.batch))
        for mode, counts in result["statistics"].items():
            dispatched = counts["dispatched"]
            print(f"graphnorm {mode}: {counts['program_ops']} program ops ({counts['fused']} fused), "
                  f"{dispatched['forward']} + {dispatched['backward']} ATen ops dispatched per step")
        for variant, by_batch in result["first_compiled_step_s"].items():
            print(f"first compiled step, {variant}: " + ", ".join(f"B={b} {s:.1f} s" for b, s in by_batch.items()))
        if result["breakdown_ms"]:
            for part, ms in result["breakdown_ms"].items():
                print(f"{part}: {ms:.1f} ms")
    announce(path)


if __name__ == "__main__":
    main()
