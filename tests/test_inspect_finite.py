"""Every analytic value of an inspect report is finite, over small random graphs (hypothesis): convolutions,
BatchNorm, activations, max and average pools, adaptive average pools that shrink or upsample a map (VGG's
``avgpool`` on a 1x1 map), constant channels, and a classifier head; and the errors against the measured
columns are finite too (a dead channel is divided by the floored std, not by zero)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import graphnorm
from graphnorm import InputStats

LAYERS = ["conv3", "conv1", "bn", "relu", "silu", "sigmoid", "maxpool", "avgpool", "adaptive", "dead"]


def _build(names: list[str], channels: int, side: int, adaptive_sizes: list[int]) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    sizes = iter(adaptive_sizes)
    for name in names:
        if name == "conv3":
            layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        elif name == "conv1":
            layers.append(nn.Conv2d(channels, channels, 1))
        elif name == "bn":
            layers.append(nn.BatchNorm2d(channels))
        elif name == "relu":
            layers.append(nn.ReLU())
        elif name == "silu":
            layers.append(nn.SiLU())
        elif name == "sigmoid":
            layers.append(nn.Sigmoid())
        elif name == "maxpool" and side >= 2:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            side = math.ceil(side / 2)
        elif name == "avgpool" and side >= 2:
            layers.append(nn.AvgPool2d(3, stride=2, padding=1))
            side = (side - 1) // 2 + 1
        elif name == "adaptive":
            side = next(sizes)
            layers.append(nn.AdaptiveAvgPool2d(side))
        elif name == "dead":  # a channel that is a constant: zero weights, a bias
            conv = nn.Conv2d(channels, channels, 1)
            with torch.no_grad():
                conv.weight[0].zero_()
            layers.append(conv)
    layers += [nn.Flatten(), nn.Linear(channels * side * side, 5)]
    return nn.Sequential(*layers).eval(), side


@example(names=["conv3", "relu", "adaptive"], side=1, adaptive_sizes=[7] * 6, seed=0)  # VGG's avgpool at 32x32
@example(names=["conv3", "relu", "conv3", "relu", "maxpool", "dead", "relu"], side=4, adaptive_sizes=[1] * 6,
         seed=1)  # dead channels
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=6), side=st.integers(1, 6),
       adaptive_sizes=st.lists(st.integers(1, 5), min_size=6, max_size=6), seed=st.integers(0, 2**16))
def test_every_analytic_value_of_an_inspect_report_is_finite(names, side, adaptive_sizes, seed) -> None:
    torch.manual_seed(seed)
    model, _ = _build(names, 3, side, adaptive_sizes)
    report = graphnorm.inspect(model, InputStats.standard(3), input_shape=(1, 3, side, side), samples=64,
                               batch_size=64, progress=False, fallback="error")
    for row in report.rows:
        analytic = (row.analytic.mean_sq, row.analytic.var, row.analytic.std_min, row.analytic.std_max)
        assert all(math.isfinite(value) for value in analytic), (names, side, row)
        errors = (row.std_error_median, row.std_error_worst, row.mean_error_median, row.mean_error_worst)
        assert all(value is None or math.isfinite(value) for value in errors), (names, side, row)
    assert "NaN" not in report.to_json() and "Infinity" not in report.to_json()
