"""torch.compile trains a converted model in every mode: the same parameters as eager after several steps,
a bounded number of compiled graphs (one for training, one for eval), fullgraph=True. The reference is the
same model trained eagerly. CPU (inductor) always; CUDA where a GPU is present."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from conversion_models import DigitsCNN
from torch._dynamo.utils import counters

import graphnorm

STATS = graphnorm.InputStats.standard(1)
MODES = [("analytic", {}), ("reparam", {}), ("normprop", {}), ("analytic", {"stochastic_batch": 8})]
IDS = ["analytic", "reparam", "normprop", "stochastic"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def deterministic_inductor():
    """Inductor draws random numbers with its own generator unless told to use torch's (stochastic mode)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode, kwargs", MODES, ids=IDS)
def test_compiled_training_equals_eager(mode: str, kwargs: dict, device: str, deterministic_inductor) -> None:
    torch.manual_seed(0)
    converted = graphnorm.convert(DigitsCNN(), STATS, input_shape=(1, 1, 8, 8), mode=mode, agreement_samples=0,
                                  **kwargs).to(device)
    eager, compiled_model = copy.deepcopy(converted), copy.deepcopy(converted)
    compiled = torch.compile(compiled_model, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, compiled_model)]
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(4, 1, 8, 8, generator=generator).to(device)
        y = torch.randint(0, 10, (4,), generator=generator).to(device)
        for model, optimizer in zip((eager, compiled), optimizers, strict=True):
            model.train()
            torch.manual_seed(step)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    for want, got in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        assert float((got - want).detach().norm() / want.detach().norm().clamp_min(1e-12)) < 1e-4
    x = torch.randn(3, 1, 8, 8, generator=generator).to(device)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-4, atol=1e-5)
        compiled(x)  # eval again: no recompilation
    assert counters["stats"]["unique_graphs"] <= 2  # one training graph, one eval graph
