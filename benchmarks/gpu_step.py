"""One training step (forward + backward + SGD with momentum) of torchvision ResNet-18 (10 classes) on a GPU, at
the batch sizes graphnorm is for: eager, with CUDA graphs through ``torch.compile(mode="reduce-overhead")``, and
with ``torch.cuda.make_graphed_callables`` (the model's forward and backward captured once, replayed every
step), beside BatchNorm, GroupNorm(32) and no normalization; plus the CUDA kernels one eager step and one
compiled step launch (torch.profiler). On a GPU every small op of the statistics pass is a kernel launch, so
the launch counts say where its time goes. One short script (a few minutes), for a machine with CUDA:

    python benchmarks/gpu_step.py                      # B = 1, 2, 8 at 64x64
    python benchmarks/gpu_step.py --batch 1,8 --size 128 --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torchvision
from common import announce, markdown_table, write_result

import graphnorm
from graphnorm import InputStats

METHODS = ("eager", "reduce-overhead", "graphed callables")


def variants(base: nn.Module, size: int) -> dict:
    def swapped(make):
        model = copy.deepcopy(base)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.BatchNorm2d):
                model.set_submodule(name, make(module.num_features))
        return model

    made = {"BatchNorm": lambda: copy.deepcopy(base),
            "GroupNorm(32)": lambda: swapped(lambda c: nn.GroupNorm(math.gcd(32, c), c)),
            "no normalization": lambda: swapped(lambda c: nn.Identity())}
    for mode in ("analytic", "reparam", "normprop"):
        made[f"graphnorm {mode}"] = lambda mode=mode: graphnorm.convert(
            base, InputStats.standard(3), input_shape=(1, 3, size, size), mode=mode, agreement_samples=0)
    return made


def stepper(model: nn.Module, method: str, batch: int, size: int):
    """A training step of ``model`` on the GPU, by ``method``; returns it after its warm-up (and capture)."""
    model = model.cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    run = model
    if method == "reduce-overhead":
        run = torch.compile(model, mode="reduce-overhead")
    elif method == "graphed callables":  # (warms up on a side stream itself, then captures)
        run = torch.cuda.make_graphed_callables(model, (x,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def kernels_per_step(step) -> int:
    """CUDA kernels one step launches (torch.profiler's CUDA events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as recorded:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in recorded.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def timed(steps: dict[str, object], repeats: int) -> dict[str, float]:
    """Median step time (ms) per step function, round-robin, with CUDA events."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=lambda text: [int(b) for b in text.split(",")], default=[1, 2, 8])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_step.py needs a CUDA GPU; this machine has none")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None, num_classes=10)
    made = variants(base, args.size)
    rows, started = [], time.perf_counter()
    for batch in args.batch:
        steps, launches, errors = {}, {}, {}
        for variant, make in made.items():
            for method in METHODS:
                label = f"{variant} | {method}"
                torch._dynamo.reset()
                try:
                    steps[label] = stepper(make(), method, batch, args.size)
                except Exception as err:  # report what fails (a capture that refuses an op, say) and go on
                    errors[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    continue
                if method != "graphed callables":
                    launches[label] = kernels_per_step(steps[label])
        medians = timed(steps, args.repeats)
        for label, ms in medians.items():
            variant, method = label.split(" | ")
            reference = medians.get(f"BatchNorm | {method}")
            rows.append({"batch": batch, "variant": variant, "method": method, "median_ms": ms,
                         "ratio_to_batchnorm": ms / reference if reference else None,
                         "kernels_per_step": launches.get(label)})
        rows += [{"batch": batch, "variant": label.split(" | ")[0], "method": label.split(" | ")[1], "error": error}
                 for label, error in errors.items()]
    device = torch.cuda.get_device_name()
    path = write_result(f"gpu_step_resnet18_{args.size}px", {"device": device, "size": args.size,
                                                             "repeats": args.repeats, "rows": rows})
    print(f"{device}, ResNet-18 at {args.size}x{args.size}, {time.perf_counter() - started:.0f} s\n")
    table = []
    for row in rows:
        if "error" in row:
            table.append([str(row["batch"]), row["variant"], row["method"], "fails: " + row["error"], "", ""])
            continue
        ratio = f"{row['ratio_to_batchnorm']:.2f}" if row["ratio_to_batchnorm"] else "n/a"
        kernels = str(row["kernels_per_step"]) if row["kernels_per_step"] is not None else ""
        table.append([str(row["batch"]), row["variant"], row["method"], f"{row['median_ms']:.2f} ms", ratio, kernels])
    print(markdown_table(["B", "variant", "method", "step", "ratio to BatchNorm", "CUDA kernels per step"], table))
    announce(path)


if __name__ == "__main__":
    main()
