"""Third cumulants (accuracy="accurate") against Monte Carlo: through linear maps exactly, through activations
better than the Gaussian rule on skewed inputs, and through a depthwise network better than fast mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphnorm import InputStats
from graphnorm.measure import analytic_batchnorm_statistics, measure
from graphnorm.moments import Moments
from graphnorm.propagate import MomentPropagator
from graphnorm.rules import RULES
from graphnorm.rules.affine import conv


def skewed_samples(draws: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Independent entries ``sum of three rectified Gaussians`` minus a shift: skewness about 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn((3, draws, *shape), generator=generator, dtype=torch.float64)).sum(0) - 1.2


def central(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = values.mean(0)
    centred = values - mean
    return mean, centred.pow(2).mean(0), centred.pow(3).mean(0)


def test_conv_carries_the_third_cumulant_of_independent_inputs() -> None:
    x = skewed_samples(200_000, (2, 6, 6), seed=0)
    weight = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = F.conv2d(x, weight, padding=1, stride=2)
    mean, var, third = central(x)
    out = conv(Moments(mean, var, (2, 6, 6), third=third), weight=weight, padding=1, stride=2,
               out_shape=tuple(y.shape[1:]))
    _, measured_var, measured_third = central(y)
    scale = measured_var.pow(1.5)
    assert ((out.third - measured_third).abs() / scale).max() < 0.05  # skewness within 0.05


@pytest.mark.parametrize("activation", ["relu", "relu6", "silu", "gelu", "sigmoid"])
def test_activation_of_a_skewed_input_beats_the_gaussian_rule(activation: str) -> None:
    x = skewed_samples(400_000, (4,), seed=2) * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    x = x + torch.tensor([0.0, -0.5, 0.3, 1.0], dtype=torch.float64)
    function = {"relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid}
    mean, var, third = central(x)
    measured_std = function[activation](x).std(0)
    rule = RULES[activation]
    skew_aware = rule(Moments(mean, var, (4,), third=third), out_shape=(4,))
    gaussian = rule(Moments(mean, var, (4,)), out_shape=(4,))
    error_skew = ((skew_aware.spread.sqrt() - measured_std) / measured_std).abs()
    error_gauss = ((gaussian.spread.sqrt() - measured_std) / measured_std).abs()
    assert error_skew.max() < 0.03  # the Gram-Charlier density is a truncated expansion
    assert error_skew.mean() < error_gauss.mean() / 2
    assert skew_aware.third is not None and gaussian.third is None


def test_accurate_mode_is_closer_after_a_depthwise_convolution() -> None:
    """A depthwise 3x3 convolution sums nine skewed ReLU outputs of one channel: the accurate mode's std of the
    activation after it is closer to the measured one than the Gaussian (fast) mode's. (A 1x1 first layer keeps
    neighbouring positions independent, the assumption both modes share; after stacked 3x3 convolutions the
    neighbour correlation both neglect dominates: docs/math.md section 6.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6()).eval()
    stats = InputStats.standard(3)
    batches = [stats.sample((64, 3, 12, 12), generator=torch.Generator().manual_seed(s)) for s in range(8)]
    errors = {}
    for accuracy in ("fast", "accurate"):
        propagator = MomentPropagator(copy.deepcopy(model), (1, 3, 12, 12), spatial=True, batch_norm="analytic",
                                      accuracy=accuracy)
        with torch.no_grad():
            table = propagator.run(stats)
        graph = propagator.graph_module
        last = [n.name for n in graph.graph.nodes if n.name in table][-2]  # the ReLU6
        measured = measure(graph, batches, [last], batchnorm_statistics=analytic_batchnorm_statistics(graph, table))
        std = measured[last].var.sqrt()
        errors[accuracy] = ((table[last].std.double() - std).abs() / std).median().item()
    assert errors["accurate"] < errors["fast"] / 2 and errors["accurate"] < 0.02


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
@pytest.mark.parametrize("per_unit", [False, True])
def test_max_pool_returns_the_third_cumulant_of_the_max(activation: str | None, per_unit: bool) -> None:
    """The max of a 3x3 window is right-skewed (0.39 for iid normals): its third cumulant, through a monotone
    activation before the pool (piecewise-polynomial, smooth) or none, against Monte Carlo."""
    mean = torch.tensor([0.0, -0.7, 1.2], dtype=torch.float64)
    std = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    x = mean.reshape(1, 3, 1, 1) + std.reshape(1, 3, 1, 1) * torch.randn((200_000, 3, 7, 7), generator=generator,
                                                                           dtype=torch.float64)
    function = {None: None, "relu": torch.relu, "sigmoid": torch.sigmoid}[activation]
    pre = Moments(mean, std.square(), (3, 7, 7), third=torch.zeros(3, dtype=torch.float64))
    if per_unit:
        pre = Moments(pre.unit_mean.clone(), pre.unit_var.clone(), pre.shape, third=torch.zeros(3, 7, 7).double())
    activated = pre if function is None else RULES[activation](pre, out_shape=pre.shape)
    out = RULES["max_pool"](activated, kernel_size=3, stride=2, padding=0, out_shape=(3, 3, 3))
    y = F.max_pool2d(x if function is None else function(x), 3, 2)
    _, measured_var, measured_third = central(y.reshape(-1, 3, 9).transpose(1, 2).reshape(-1, 3))
    third = out.to_channels().third
    assert third is not None
    measured_skew = measured_third / measured_var.pow(1.5)
    skew_error = (third / measured_var.pow(1.5) - measured_skew).abs()
    assert (skew_error < 0.03 + 0.02 * measured_skew.abs()).all(), (skew_error, measured_skew)
    assert (measured_skew.abs() > 0.2).all()  # the case is really skewed


def test_cat_keeps_the_third_cumulants_of_its_parts() -> None:
    parts = [Moments(torch.zeros(2), torch.ones(2), (2, 4, 4), third=torch.tensor([0.5, -0.1])),
             Moments(torch.zeros(3, 4, 4), torch.ones(3, 4, 4), (3, 4, 4), third=torch.full((3, 4, 4), 0.2))]
    out = RULES["cat"](*parts, dim=1, out_shape=(5, 4, 4))
    assert torch.allclose(out.to_channels().third, torch.tensor([0.5, -0.1, 0.2, 0.2, 0.2]))
    channel_parts = [Moments(p.mean, p.var, p.shape, third=p.to_channels().third) for p in parts]
    assert torch.allclose(RULES["cat"](*channel_parts, dim=1, out_shape=(5, 4, 4)).third,
                          torch.tensor([0.5, -0.1, 0.2, 0.2, 0.2]))


def test_relu_after_a_normalized_max_pool_is_corrected_for_its_skewness() -> None:
    """DenseNet's pattern: max-pool, BatchNorm, ReLU. The accurate mode's std after the ReLU is within 2.5% of
    Monte Carlo; the fast mode (Gaussian) is off by about 8%."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.BatchNorm2d(16), nn.ReLU()).eval()
    torch.manual_seed(0)
    for module in model:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.2)
    stats = InputStats.standard(3)
    errors = {}
    for accuracy in ("fast", "accurate"):
        propagator = MomentPropagator(copy.deepcopy(model), (1, 3, 16, 16), spatial=True, batch_norm="analytic",
                                      accuracy=accuracy)
        table = propagator.run(stats)
        graph_module = propagator.graph_module
        last = list(table)[-1]
        overrides = analytic_batchnorm_statistics(graph_module, table)
        generator = torch.Generator().manual_seed(1)
        batches = [stats.sample((256, 3, 16, 16), generator=generator) for _ in range(8)]
        measured = measure(graph_module, batches, [last], batchnorm_statistics=overrides)[last]
        errors[accuracy] = ((table[last].std.double() - measured.var.sqrt()).abs() / measured.var.sqrt()).median()
    assert errors["accurate"] < 0.025, errors
    assert errors["fast"] > 3 * errors["accurate"], errors
