"""The sampled fallback (graphnorm.sampling) against Monte Carlo, and its contract: deterministic, exact for
affine ops, differentiable, listed wherever the user looks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from montecarlo import monte_carlo

import graphnorm
from graphnorm import InputStats, MomentPropagator

MEAN, STD = [0.5, -1.0, 2.0, 0.0], [1.0, 0.5, 2.0, 1.5]
SHAPE = (1, 4, 6, 6)


class Unruled(nn.Module):
    """Ops without closed-form rules on independent units (the fallback's own assumption, so what is measured is
    the sampling error): a softmax over channels of row means, a softsign, a max over positions."""

    def __init__(self):
        super().__init__()
        self.soft = nn.Softsign()  # a torch.nn module graphnorm has no rule for

    def forward(self, x):
        gate = torch.softmax(x[:, 2:].mean(3, keepdim=True), dim=1)
        return torch.cat([self.soft(x[:, :2]) * gate, x.amax(dim=3, keepdim=True).expand_as(x)], dim=1)


def _moments(model: nn.Module, samples: int, spatial: bool = False):
    propagator = MomentPropagator(model, SHAPE, dtype=torch.float64, fallback_samples=samples, spatial=spatial)
    return propagator, propagator.run(InputStats(MEAN, STD))["output"]


@pytest.mark.parametrize("spatial", [False, True], ids=["per-channel", "per-unit"])
def test_sampled_ops_within_two_percent_of_monte_carlo(spatial: bool) -> None:
    model = Unruled().double().eval()
    propagator, result = _moments(model, 1024, spatial)
    assert {node.target for node in propagator.sampled.values()} == {"Softsign", "torch.softmax", "Tensor.amax"}
    reference = monte_carlo(model, MEAN, STD, SHAPE[1:], per_unit=spatial)
    mean, var = (result.unit_mean, result.unit_var) if spatial else (result.mean, result.var)
    std_ref = reference.var.sqrt()
    assert ((mean - reference.mean).abs() / std_ref).max() < 0.02 + 6 * (reference.se_mean / std_ref).max()
    assert ((var.sqrt() - std_ref).abs() / std_ref).max() < 0.02 + 6 * (reference.se_var / reference.var).max()


def test_affine_ops_are_exact_when_sampled() -> None:
    """Antithetic, standardized draws make the sample moments of an affine op its exact moments."""

    class Affine(nn.Module):
        def forward(self, x):
            return 3.0 * x.flip(2) - 2.0  # flip has no rule

    model = Affine().double()
    propagator, result = _moments(model, 8)
    assert list(propagator.sampled) == ["flip"]
    torch.testing.assert_close(result.mean, 3.0 * torch.tensor(MEAN, dtype=torch.float64) - 2.0)
    torch.testing.assert_close(result.var, 9.0 * torch.tensor(STD, dtype=torch.float64) ** 2)


def test_sampled_statistics_are_deterministic_and_differentiable() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 3, 3), nn.Softsign()).double()
    _, first = _moments(model, 64)
    _, second = _moments(model, 64)
    assert torch.equal(first.mean, second.mean) and torch.equal(first.var, second.var)
    first.var.sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_fallback_error_lists_every_op_and_bad_samples_are_refused() -> None:
    with pytest.raises(graphnorm.UnsupportedOpError) as info:
        MomentPropagator(Unruled(), SHAPE, fallback="error")
    assert "3 op(s)" in str(info.value)
    with pytest.raises(graphnorm.GraphnormError, match="even integer"):
        MomentPropagator(Unruled(), SHAPE, fallback_samples=7)
    with pytest.raises(graphnorm.GraphnormError, match="'sample' or 'error'"):
        MomentPropagator(Unruled(), SHAPE, fallback="maybe")


def test_conversion_log_and_inspect_name_the_sampled_nodes() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Softsign(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    converted = graphnorm.convert(model, InputStats(MEAN, STD), input_shape=SHAPE, agreement_samples=0)
    log = converted.graphnorm_log
    assert [node.target for node in log.sampled] == ["Softsign"] and log.fallback_samples == 256
    assert "Softsign" in str(log) and log.to_dict()["sampled"][0]["reason"] == "no moment rule"
    # the converted model keeps sampling that op for its own statistics: batch-independent and train == eval
    x = torch.randn(8, 4, 6, 6)
    converted.train()
    batch = converted(x)
    single = torch.cat([converted(x[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(batch, single)
    report = graphnorm.inspect(model, InputStats(MEAN, STD), input_shape=SHAPE, samples=64, progress=False)
    sampled_rows = [row for row in report.rows if row.sampled]
    assert [row.op for row in sampled_rows] == ["Softsign"]
    with pytest.raises(graphnorm.UnsupportedOpError):
        graphnorm.convert(model, InputStats(MEAN, STD), input_shape=SHAPE, fallback="error")
