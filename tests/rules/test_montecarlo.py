"""Every moment rule against Monte Carlo (see cases.py for the cases and montecarlo.py for the tolerances)."""

from __future__ import annotations

import pytest
import torch
from cases import BINARY_CASES, CASES, BinaryCase, Case
from montecarlo import assert_close, monte_carlo

import graphnorm
from graphnorm import InputStats, Moments


def _prepare(case: Case) -> torch.nn.Module:
    module = case.build().double()
    return module.train() if case.train else module.eval()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule_matches_monte_carlo(case: Case) -> None:
    module = _prepare(case)
    stats = InputStats(case.mean, case.std)
    table = graphnorm.propagate(module, stats, (1, *case.shape), spatial=case.spatial, dtype=torch.float64)
    result = table["output"]
    reference = monte_carlo(module, case.mean, case.std, case.shape, per_unit=case.spatial, crop=case.crop)
    if case.spatial:
        assert_close(result.unit_mean, result.unit_var, reference, rtol=case.rtol, label=case.id)
    else:
        assert_close(result.mean, result.var, reference, rtol=case.rtol, label=case.id)


OPERANDS = [  # (mean_a, var_a, mean_b, var_b) per channel
    ([0.0, 2.0, -3.0, 0.5], [1.0, 0.25, 1.0, 16.0]),
    ([1.0, -1.0, 4.0, 0.0], [0.5, 2.0, 1.0, 1.0]),
]


@pytest.mark.parametrize("case", BINARY_CASES, ids=lambda c: c.id)
def test_binary_rule_on_independent_operands(case: BinaryCase) -> None:
    (mean_a, var_a), (mean_b, var_b) = OPERANDS
    a = Moments.per_channel(torch.tensor(mean_a, dtype=torch.float64), torch.tensor(var_a, dtype=torch.float64), (4,))
    b = Moments.per_channel(torch.tensor(mean_b, dtype=torch.float64), torch.tensor(var_b, dtype=torch.float64), (4,))
    result = graphnorm.RULES[case.key](a, b, out_shape=(4,), **case.params)
    joint_mean = mean_a + mean_b
    joint_std = [v**0.5 for v in var_a + var_b]
    reference = monte_carlo(lambda x: case.fn(x[:, :4], x[:, 4:]), joint_mean, joint_std, (8,))
    assert_close(result.mean, result.var, reference, label=case.id)


def test_relu_of_standard_normal_gives_normprop_constants() -> None:
    import math

    result = graphnorm.RULES["relu"](Moments.per_channel(torch.zeros(1, dtype=torch.float64),
                                                         torch.ones(1, dtype=torch.float64), (1,)))
    assert result.mean.item() == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-12)
    assert result.var.item() == pytest.approx((1 - 1 / math.pi) / 2, rel=1e-12)
    assert result.mean.item() == pytest.approx(0.398942, abs=1e-6)
    assert result.var.item() == pytest.approx(0.340845, abs=1e-6)
    assert 1 / result.std.item() == pytest.approx(1.71396, rel=1e-3)  # NF-Net's published ReLU gain
