"""The max-pool rule per unit: the max of independent Gaussians with their own means and variances
(``graphnorm.rules.pooling.max_of_independent``) against the iid order statistics and Monte Carlo, and the
per-unit rule on a small map, where zero padding gives every position its own mean, against the module run on
samples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import graphnorm
from graphnorm import InputStats
from graphnorm.rules.gaussian import max_order_statistics, max_third_cumulant
from graphnorm.rules.pooling import max_of_independent

DTYPE = torch.float64


@pytest.mark.parametrize("window", [1, 2, 4, 9])
def test_equal_values_give_the_iid_order_statistics(window: int) -> None:
    mean = torch.full((1, window, 1), 0.3, dtype=DTYPE)
    var = torch.full((1, window, 1), 2.0, dtype=DTYPE)
    valid = torch.ones(1, window, 1, dtype=torch.bool)
    out_mean, out_var, third = max_of_independent(mean, var, valid, skewed=True)
    offset, shrink = max_order_statistics(window)
    assert out_mean.item() == pytest.approx(0.3 + math.sqrt(2.0) * offset, rel=1e-7, abs=1e-9)
    assert out_var.item() == pytest.approx(2.0 * shrink, rel=1e-6)
    assert third.item() == pytest.approx(2.0**1.5 * max_third_cumulant(window), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("activation", [None, torch.relu, torch.sigmoid], ids=["identity", "relu", "sigmoid"])
def test_unequal_values_against_monte_carlo(activation) -> None:
    # three windows: spread means, one dominant value, a padded entry (mean 0, var 0, invalid)
    mean = torch.tensor([[[0.0, 2.0, -1.0], [1.0, -3.0, 0.5], [-2.0, 0.1, 0.0], [0.5, 0.2, 0.0]]], dtype=DTYPE)
    var = torch.tensor([[[0.01, 1.0, 0.3], [0.04, 0.5, 0.3], [1.0, 2.0, 0.0], [1e-4, 0.2, 0.0]]], dtype=DTYPE)
    valid = torch.tensor([[[True, True, True], [True, True, True], [True, True, False], [False, True, False]]])
    breakpoints = (0.0,) if activation is torch.relu else ()
    out_mean, out_var, third = max_of_independent(mean, var, valid, activation, breakpoints, skewed=True)
    generator = torch.Generator().manual_seed(0)
    draws = mean + var.sqrt() * torch.randn(400_000, *mean.shape[1:], generator=generator, dtype=DTYPE)
    draws = torch.where(valid[0], draws, -math.inf).amax(1)  # [N, L]
    values = draws if activation is None else activation(draws)
    reference_std = values.std(0)
    centered = values - values.mean(0)
    torch.testing.assert_close(out_mean[0], values.mean(0), rtol=0, atol=float(5e-3 * reference_std.max()))
    torch.testing.assert_close(out_var[0].sqrt(), reference_std, rtol=5e-3, atol=1e-9)
    torch.testing.assert_close(third[0], centered.pow(3).mean(0), rtol=0, atol=float(0.02 * reference_std.max() ** 3))


def test_the_iid_mixture_is_what_the_exact_rule_corrects() -> None:
    """Two values far apart in mean: the max is the larger one, nearly; a mixture would add their spread."""
    mean = torch.tensor([[[0.0], [10.0]]], dtype=DTYPE)
    var = torch.full((1, 2, 1), 1.0, dtype=DTYPE)
    out_mean, out_var, _ = max_of_independent(mean, var, torch.ones(1, 2, 1, dtype=torch.bool))
    assert out_mean.item() == pytest.approx(10.0, abs=1e-6) and out_var.item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1)], ids=["2x2", "3x3-padded"])
def test_per_unit_max_pool_of_positions_with_their_own_means(pool: nn.Module) -> None:
    """ReLU -> max-pool on a 4x4 map whose positions have their own means and variances (what zero padding
    upstream does to small maps: VGG11-BN's last pool at 32x32 input was 13x off in variance with the
    window's mixture), independent: the per-unit rule against the module run on samples of that input."""
    generator = torch.Generator().manual_seed(0)
    unit_mean = torch.randn(3, 4, 4, generator=generator)
    unit_std = 0.2 + torch.rand(3, 4, 4, generator=generator)
    data = unit_mean + unit_std * torch.randn(100_000, 3, 4, 4, generator=generator)
    stats = InputStats.from_data(data, per_position=True)
    model = nn.Sequential(nn.ReLU(), pool).eval()
    table = graphnorm.propagate(model, stats, (1, 3, 4, 4), spatial=True, accuracy="fast")
    analytic = table["_1"]
    with torch.no_grad():
        measured = model(data).double()
    ratio = analytic.unit_var.double().sqrt() / measured.std(0)
    mean_error = (analytic.unit_mean.double() - measured.mean(0)).abs() / measured.std(0)
    assert ratio.sub(1).abs().max() < 0.02, ratio
    assert mean_error.max() < 0.02, mean_error
