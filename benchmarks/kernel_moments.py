"""Kernel moments ``(W m, (W*W) v)`` over every conv weight of torchvision ResNet-18 (11.2 M weights), forward
and forward + backward, in the formulations one could write: graphnorm's custom op (GEMVs over whole weight rows
against the moments repeated over the taps, fused backward), the same arithmetic as reductions over the kernel
taps through autograd, and torch ``_weight_norm`` over the same weights as the anchor (one weight-based
normalizer's forward + backward). Two memory-traffic units beside them: one pass reading every weight
(``w.sum()``) and one reading and writing every weight (``torch.mul(w, 2, out=kept)``, into buffers kept
from run to run). A GEMV does two flops per weight read, so on a CPU these ops run at memory bandwidth, not at
the arithmetic rate of a convolution: the kernel moments' cost is best read in passes over the weights.
Interleaved medians.

    python benchmarks/kernel_moments.py --repeats 30
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from common import announce, interleaved_medians, markdown_table, write_result

from graphnorm.rules.kernels import kernel_moments


def tap_reductions(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The plain formula: sum the kernel over its taps, then a matrix-vector product per moment."""
    taps = tuple(range(2, weight.dim()))
    return weight.sum(taps) @ mean, (weight * weight).sum(taps) @ var


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [p for p in torchvision.models.resnet18(weights=None).parameters() if p.dim() == 4]
    means = [torch.rand(w.shape[1], requires_grad=True) for w in weights]
    variances = [torch.rand(w.shape[1], requires_grad=True) for w in weights]
    gains = [torch.ones(w.shape[0], 1, 1, 1, requires_grad=True) for w in weights]

    def run(formula, backward: bool) -> None:
        outputs = [formula(w, m, v) for w, m, v in zip(weights, means, variances, strict=True)]
        if backward:
            sum(t.sum() for pair in outputs for t in pair).backward()
            for tensor in (*weights, *means, *variances, *gains):
                tensor.grad = None

    gain_of = {id(w): g for w, g in zip(weights, gains, strict=True)}

    def weight_norm(w, _m, _v):
        return (torch._weight_norm(w, gain_of[id(w)], 0),)

    kept = [torch.empty_like(w) for w in weights]

    def read_pass() -> None:
        with torch.no_grad():
            for w in weights:
                w.sum()

    def read_write_pass() -> None:
        with torch.no_grad():
            for w, out in zip(weights, kept, strict=True):
                torch.mul(w, 2.0, out=out)

    candidates = {"memory unit: read every weight once": read_pass,
                  "memory unit: read and write every weight once": read_write_pass}
    for name, formula in (("graphnorm custom op", kernel_moments), ("tap reductions, autograd", tap_reductions),
                          ("torch _weight_norm (anchor)", weight_norm)):
        candidates[f"{name}: forward"] = lambda f=formula: run(f, False)
        candidates[f"{name}: forward + backward"] = lambda f=formula: run(f, True)
    medians = interleaved_medians(candidates, args.repeats)
    rows = [[name, f"{seconds * 1e3:.1f} ms"] for name, seconds in medians.items()]
    print(markdown_table(["formulation (ResNet-18 conv weights)", "median"], rows))
    announce(write_result("kernel_moments_resnet18", {"repeats": args.repeats,
                                                      "median_ms": {k: v * 1e3 for k, v in medians.items()}}))


if __name__ == "__main__":
    main()
