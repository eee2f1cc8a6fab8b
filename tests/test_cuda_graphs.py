"""A converted model trains with CUDA graphs: ``torch.compile(mode="reduce-overhead")`` and
``torch.cuda.make_graphed_callables``, in every trainable mode, with the parameters an eager run reaches. Needs a
CUDA GPU (skipped otherwise; benchmarks/gpu_step.py measures the same on one)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conversion_models import DigitsCNN

import graphnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
MODES = ["analytic", "reparam", "normprop"]


def _trained(model, run, steps: int = 4) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 1, 8, 8, device="cuda", generator=generator)
    y = torch.randint(0, 10, (4,), device="cuda", generator=generator)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        optimizer.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["reduce-overhead", "graphed callables"])
@pytest.mark.parametrize("mode", MODES)
def test_training_with_cuda_graphs_equals_eager(mode: str, method: str) -> None:
    torch.manual_seed(0)
    converted = graphnorm.convert(DigitsCNN(), graphnorm.InputStats.standard(1), input_shape=(1, 1, 8, 8),
                                  mode=mode, agreement_samples=0).cuda().train()
    eager, graphed = copy.deepcopy(converted), copy.deepcopy(converted)
    want = _trained(eager, eager)
    torch._dynamo.reset()
    if method == "reduce-overhead":
        run = torch.compile(graphed, mode="reduce-overhead")
    else:
        run = torch.cuda.make_graphed_callables(graphed, (torch.randn(4, 1, 8, 8, device="cuda"),))
    got = _trained(graphed, run)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
