"""Activation rules against a dense numerical integration in float64: a second, much tighter reference than
Monte Carlo (which resolves ~1% here), over a grid of input means and stds far wider than networks need.

The reference integrates ``f(x)`` and ``f(x)^2`` against the Gaussian density on 400,001 points over
``mean +- 12 std`` (trapezoid); its own error is below 1e-9 relative for these functions.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphnorm
from graphnorm import Moments
from graphnorm.rules.gaussian import max_order_statistics

FUNCTIONS = {
    "relu": (torch.relu, {}),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.1), {"negative_slope": 0.1}),
    "relu6": (F.relu6, {}),
    "hardtanh": (F.hardtanh, {}),
    "hardsigmoid": (F.hardsigmoid, {}),
    "hardswish": (F.hardswish, {}),
    "sigmoid": (torch.sigmoid, {}),
    "tanh": (torch.tanh, {}),
    "gelu": (F.gelu, {}),
    "silu": (F.silu, {}),
    "elu": (F.elu, {}),
    "softplus": (F.softplus, {}),
    "mish": (F.mish, {}),
}
MEANS = [-8.0, -2.0, -0.3, 0.0, 0.7, 3.0, 10.0]
STDS = [0.05, 0.5, 1.0, 4.0, 20.0]


def reference_moments(function, mean: float, std: float) -> tuple[float, float]:
    x = torch.linspace(mean - 12 * std, mean + 12 * std, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    y = function(x)
    center = function(torch.tensor(mean, dtype=torch.float64))
    first = torch.trapezoid((y - center) * density, x)
    second = torch.trapezoid((y - center) ** 2 * density, x)
    return (center + first).item(), (second - first * first).item()


@pytest.mark.parametrize("key", sorted(FUNCTIONS))
def test_activation_rule_matches_dense_integration(key: str) -> None:
    function, params = FUNCTIONS[key]
    grid = list(itertools.product(MEANS, STDS))
    mean = torch.tensor([m for m, _ in grid], dtype=torch.float64)
    std = torch.tensor([s for _, s in grid], dtype=torch.float64)
    result = graphnorm.RULES[key](Moments.per_channel(mean, std**2, (len(grid),)), **params)
    for i, (m, s) in enumerate(grid):
        ref_mean, ref_var = reference_moments(function, m, s)
        scale = max(ref_var, 1e-300) ** 0.5
        assert abs(result.mean[i].item() - ref_mean) <= 1e-6 * max(scale, abs(ref_mean)) + 1e-12, (key, m, s)
        assert abs(result.var[i].item() - ref_var) <= 1e-5 * ref_var + 1e-12, (key, m, s, result.var[i].item(), ref_var)


def test_order_statistics_of_the_max_match_published_constants() -> None:
    mean, var = max_order_statistics(9)
    assert mean == pytest.approx(1.485013, abs=2e-6)
    assert var == pytest.approx(0.357353, abs=2e-6)
    assert max_order_statistics(2) == pytest.approx((1 / math.sqrt(math.pi), 1 - 1 / math.pi), abs=1e-9)


def test_max_statistics_match_monte_carlo() -> None:
    generator = torch.Generator().manual_seed(3)
    for n in (4, 9):
        draws = torch.randn(400_000, n, generator=generator, dtype=torch.float64).amax(1)
        mean, var = max_order_statistics(n)
        assert mean == pytest.approx(draws.mean().item(), abs=6 * draws.std().item() / 400_000**0.5)
        assert var == pytest.approx(draws.var().item(), rel=0.01)


def test_plain_gauss_hermite_is_not_enough_where_the_split_is() -> None:
    """Why smooth activations are not integrated by plain Gauss-Hermite (docs/math.md): with 64 nodes its
    variance of tanh(N(0.5, 16)) is off by 0.4%, the asymptote split by less than 1e-5."""
    points, weights = np.polynomial.hermite.hermgauss(64)
    values = np.tanh(0.5 + 4.0 * math.sqrt(2.0) * points)
    weights = weights / math.sqrt(math.pi)
    hermite_var = float((weights * values**2).sum() - (weights * values).sum() ** 2)
    _, reference_var = reference_moments(torch.tanh, 0.5, 4.0)
    rule = graphnorm.RULES["tanh"](Moments.per_channel(torch.tensor([0.5], dtype=torch.float64),
                                                       torch.tensor([16.0], dtype=torch.float64), (1,)))
    assert abs(hermite_var - reference_var) / reference_var > 3e-3
    assert abs(rule.var.item() - reference_var) / reference_var < 1e-5
