"""Accuracy of the statistics a fixed-mode conversion holds: torchvision networks with random weights, converted
with ``graphnorm.convert(model, InputStats.standard(3), input_shape=(1, 3, S, S), mode="fixed",
calibrate="none")`` (every other option at its default), then the real per-channel std of every
FixedBatchNorm's input measured on N(0, 1) samples through the converted model itself, against the analytic
std the normalizer holds (its running variance).

Per site: the median over channels of ``|analytic - measured| / d``, ``d`` the measured std floored at
``graphnorm.report.STD_FLOOR`` times the site's median measured std (``relative_errors``, the metric of
``graphnorm inspect``), and the site's dead channels (below the floor). Per network and size: the median and the
worst over sites, the conversion time, and the noise floor of the measurement (the same statistic between the
two halves of the samples, divided by 2).

    python benchmarks/fixed_mode_accuracy.py                                     # the five networks, 64 and 224
    python benchmarks/fixed_mode_accuracy.py --models efficientnet_b0 --sizes 64 --worst 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from common import announce, markdown_table, write_result

import graphnorm
from graphnorm import InputStats
from graphnorm.normalizers import FixedBatchNorm
from graphnorm.report import relative_errors

MODELS = ("resnet18", "vgg11_bn", "densenet121", "mobilenet_v2", "efficientnet_b0")


class _ChannelMoments:
    """Running per-channel sums of an activation ``[N, C, ...]`` (float64), split into two halves of the
    samples for the noise floor."""

    def __init__(self) -> None:
        self.sums: list[list[torch.Tensor]] = [[], []]

    def add(self, values: torch.Tensor, half: int) -> None:
        flat = values.detach().double().transpose(0, 1).reshape(values.shape[1], -1)
        moments = torch.stack([torch.full_like(flat[:, 0], flat.shape[1]), flat.sum(1), flat.square().sum(1)])
        self.sums[half].append(moments)

    def std(self, halves: tuple[int, ...] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        count, total, squares = sum(sum(self.sums[h]) for h in halves)
        mean = total / count
        return mean, (squares / count - mean.square()).clamp_min(0).sqrt()


def measure(name: str, size: int, samples: int, batch: int, worst: int) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    start = time.perf_counter()
    converted = graphnorm.convert(model, InputStats.standard(3), input_shape=(1, 3, size, size), mode="fixed",
                                  calibrate="none")
    seconds = time.perf_counter() - start
    sites = {path: module for path, module in converted.named_modules() if isinstance(module, FixedBatchNorm)}
    moments = {path: _ChannelMoments() for path in sites}
    current = [0]
    hooks = [module.register_forward_hook(lambda m, args, out, path=path: moments[path].add(args[0], current[0]))
             for path, module in sites.items()]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for index, start_at in enumerate(range(0, samples, batch)):
            current[0] = index % 2
            converted(torch.randn(min(batch, samples - start_at), 3, size, size, generator=generator))
    for hook in hooks:
        hook.remove()
    errors, noise, dead, per_site = [], [], 0, []
    for path, module in sites.items():
        analytic_std = module.running_var.double().sqrt()
        measured_mean, measured_std = moments[path].std()
        site_error, _, site_dead = relative_errors(measured_mean, analytic_std, measured_mean, measured_std)
        _, first = moments[path].std((0,))
        _, second = moments[path].std((1,))
        half_error, _, _ = relative_errors(first, first, first, second)
        errors.append(float(site_error.median()))
        noise.append(float(half_error.median()) / 2)
        dead += site_dead
        per_site.append((errors[-1], path))
    per_site.sort(reverse=True)
    return {"model": name, "size": size, "samples": samples, "sites": len(sites),
            "std_error_median": statistics.median(errors), "std_error_worst": max(errors),
            "noise_floor": statistics.median(noise), "dead_channels": dead, "convert_seconds": seconds,
            "worst_sites": [{"site": path, "std_error": error} for error, path in per_site[:worst]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 224])
    parser.add_argument("--samples", type=int, help="inputs drawn per network (default: 512 at 64, 64 at 224)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--worst", type=int, default=3, help="list this many worst sites per network")
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        for name in args.models:
            samples = args.samples or (512 if size <= 64 else 64)
            result = measure(name, size, samples, args.batch, args.worst)
            results.append(result)
            print(f"{name} {size}x{size}: median {result['std_error_median']:.3f}, worst "
                  f"{result['std_error_worst']:.3f}, convert {result['convert_seconds']:.1f} s; worst sites "
                  + ", ".join(f"{s['site']} {s['std_error']:.3f}" for s in result["worst_sites"]), flush=True)
    print()
    print(markdown_table(
        ["model", "size", "std error median", "worst", "noise floor", "dead channels", "convert (s)"],
        [[r["model"], f"{r['size']}x{r['size']}", f"{r['std_error_median']:.3f}", f"{r['std_error_worst']:.3f}",
          f"{r['noise_floor']:.3f}", str(r["dead_channels"]), f"{r['convert_seconds']:.1f}"] for r in results]))
    suffix = "" if (args.models, args.sizes) == (list(MODELS), [64, 224]) else "_subset"
    announce(write_result(f"fixed_mode_accuracy{suffix}", {"results": results}))


if __name__ == "__main__":
    main()
