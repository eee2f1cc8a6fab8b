"""Neighbour correlation templates (accuracy="accurate") against Monte Carlo: through convolutions, activations,
average and global pooling, gates and residual adds; and what they are for, the variance of a pool or conv
that sums correlated neighbours."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from graphnorm.moments import Moments
from graphnorm.rules import RULES
from graphnorm.rules.neighbours import RADIUS, activation_template, hermite_coefficients

DRAWS = 40_000


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def measured_template(samples: torch.Tensor, radius: int = RADIUS, crop: int = 3) -> torch.Tensor:
    """Per-channel correlation of positions at offsets within ``radius`` of the interior of ``[N, C, H, W]``
    samples (crop keeps border effects out)."""
    x = samples[..., crop:-crop, crop:-crop]
    x = x - x.mean(0, keepdim=True)
    height, width = x.shape[-2:]
    var = x.square().mean((0, 2, 3))
    out = torch.zeros(x.shape[1], 2 * radius + 1, 2 * radius + 1, dtype=x.dtype)
    for dh in range(-radius, radius + 1):
        for dw in range(-radius, radius + 1):
            a = x[..., max(0, -dh):height - max(0, dh), max(0, -dw):width - max(0, dw)]
            b = x[..., max(0, dh):height - max(0, -dh) or None, max(0, dw):width - max(0, -dw) or None]
            out[:, dh + radius, dw + radius] = (a * b).mean((0, 2, 3)) / var
    return out


def _conv_pair(seed: int = 0):
    """A depthwise 3x3 conv (channels stay independent, as the rules assume; neighbours do not), then a dense
    3x3 conv that sums correlated neighbours."""
    weights = [torch.randn(8, 1, 3, 3, generator=_generator(seed), dtype=torch.float64) / 3,
               torch.randn(6, 8, 3, 3, generator=_generator(seed + 1), dtype=torch.float64) / 8]
    x = torch.randn(DRAWS, 8, 14, 14, generator=_generator(seed + 2), dtype=torch.float64)
    return weights, x


def _accurate_input(shape: tuple[int, ...]) -> Moments:
    return Moments(torch.zeros(shape[0], dtype=torch.float64), torch.ones(shape[0], dtype=torch.float64), shape,
                   third=torch.zeros(shape[0], dtype=torch.float64))


def test_conv_relu_conv_template_and_variance_match_monte_carlo() -> None:
    weights, x = _conv_pair()
    first = F.conv2d(x, weights[0], padding=1, groups=8)
    hidden = torch.relu(first)
    second = F.conv2d(hidden, weights[1], padding=1)
    moments = RULES["conv"](_accurate_input((8, 14, 14)), weight=weights[0], padding=1, groups=8,
                            out_shape=(8, 14, 14))
    assert torch.allclose(moments.neighbours, measured_template(first), atol=0.02)
    moments = RULES["relu"](moments, out_shape=(8, 14, 14))
    assert torch.allclose(moments.neighbours, measured_template(hidden), atol=0.02)
    out = RULES["conv"](moments, weight=weights[1], padding=1, out_shape=(6, 14, 14))
    interior = second[..., 3:-3, 3:-3]
    measured_var = interior.var((0, 2, 3))
    independent = RULES["conv"](Moments(moments.loc, moments.spread, moments.shape), weight=weights[1], padding=1,
                                out_shape=(6, 14, 14))
    error = (out.var / measured_var - 1).abs()
    assert error.max() < 0.02, error
    assert (independent.var / measured_var - 1).abs().max() > 3 * error.max()  # the case needs the correlation
    assert torch.allclose(out.neighbours, measured_template(second), atol=0.03)


@pytest.mark.parametrize("activation", ["relu", "silu", "tanh", "relu6"])
def test_activation_template_matches_bivariate_monte_carlo(activation: str) -> None:
    function = {"relu": torch.relu, "silu": F.silu, "tanh": torch.tanh, "relu6": F.relu6}[activation]
    mean = torch.tensor([0.0, -0.5, 1.0], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 0.7], dtype=torch.float64)
    rho = torch.tensor([0.9, 0.4, -0.6], dtype=torch.float64)
    z1 = torch.randn(400_000, 3, generator=_generator(4), dtype=torch.float64)
    z2 = rho * z1 + (1 - rho.square()).sqrt() * torch.randn(400_000, 3, generator=_generator(5), dtype=torch.float64)
    y1, y2 = function(mean + std * z1), function(mean + std * z2)
    measured = ((y1 - y1.mean(0)) * (y2 - y2.mean(0))).mean(0) / (y1.std(0) * y2.std(0))
    template = torch.zeros(3, 3, dtype=torch.float64)
    template[:, 1], template[:, 2] = 1, rho
    out = activation_template(hermite_coefficients(function, mean, std.square()), template)
    assert torch.allclose(out[:, 2], measured, atol=0.01), (out[:, 2], measured)
    assert torch.all(out[:, 1] == 1)


def _with_measured(samples: torch.Tensor) -> Moments:
    """Moments of ``[N, C, H, W]`` samples per channel, with their measured template, in accurate mode."""
    interior = samples[..., 3:-3, 3:-3]
    mean, var = interior.mean((0, 2, 3)), interior.var((0, 2, 3))
    return Moments(mean, var, tuple(samples.shape[1:]), third=torch.zeros_like(mean),
                   neighbours=measured_template(samples))


def test_average_pool_of_correlated_neighbours_matches_monte_carlo() -> None:
    weights, x = _conv_pair(seed=7)
    field = torch.relu(F.conv2d(x, weights[0], padding=1, groups=8))
    moments = _with_measured(field)
    pooled = F.avg_pool2d(field, 2)
    out = RULES["avg_pool"](moments, kernel_size=2, out_shape=(8, 7, 7))
    measured_var = pooled[..., 1:-1, 1:-1].var((0, 2, 3))
    assert ((out.var / measured_var) - 1).abs().max() < 0.03
    independent = RULES["avg_pool"](Moments(moments.loc, moments.spread, moments.shape), kernel_size=2,
                                    out_shape=(8, 7, 7))
    assert ((independent.var / measured_var) - 1).abs().max() > 0.1


def test_global_average_pool_of_correlated_neighbours_matches_monte_carlo() -> None:
    weights, x = _conv_pair(seed=9)
    field = F.conv2d(x, weights[0], padding=1, groups=8)[..., 1:-1, 1:-1]  # 12x12 without the padded border
    moments = _with_measured(F.conv2d(x, weights[0], padding=1, groups=8))
    moments = Moments(moments.loc, moments.spread, (8, 12, 12), third=moments.third, neighbours=moments.neighbours)
    out = RULES["adaptive_avg_pool"](moments, out_shape=(8, 1, 1))
    measured_var = field.mean((2, 3)).var(0)
    assert ((out.var / measured_var) - 1).abs().max() < 0.05, out.var / measured_var


def test_gate_and_residual_templates_match_monte_carlo() -> None:
    weights, x = _conv_pair(seed=11)
    field = F.conv2d(x, weights[0], padding=1, groups=8) + 0.5
    gate = torch.sigmoid(field.mean((2, 3), keepdim=True) * 3 + torch.randn(DRAWS, 8, 1, 1, generator=_generator(12),
                                                                            dtype=torch.float64))
    gated = field * gate.detach()[torch.randperm(DRAWS, generator=_generator(13))]  # independent of the field
    moments = _with_measured(field)
    gate_moments = Moments(gate.mean((0, 2, 3)), gate.var((0, 2, 3)), (8, 1, 1))
    out = RULES["mul"](moments, gate_moments, out_shape=(8, 14, 14))
    assert torch.allclose(out.neighbours, measured_template(gated), atol=0.02)
    noise = torch.randn(DRAWS, 8, 14, 14, generator=_generator(14), dtype=torch.float64)
    summed = field + noise
    noise_moments = Moments(torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), (8, 14, 14),
                            third=torch.zeros(8, dtype=torch.float64))
    out = RULES["add"](moments, noise_moments, out_shape=(8, 14, 14))
    assert torch.allclose(out.neighbours, measured_template(summed), atol=0.02)


def test_inverted_residual_projection_matches_monte_carlo_with_channel_correlation() -> None:
    """MobileNetV2's block: 1x1 expansion of 4 channels to 24, ReLU6, depthwise 3x3, ReLU6, 1x1 projection to 6.
    The 24 expanded channels span 4 dimensions, so the projection sums correlated channels: AP2 is far off,
    the carried channel correlation is within 4% of Monte Carlo (AP2: 5-15%)."""
    generator = _generator(21)
    expand = torch.randn(24, 4, 1, 1, generator=generator, dtype=torch.float64) / 2
    depthwise = torch.randn(24, 1, 3, 3, generator=generator, dtype=torch.float64) / 3
    project = torch.randn(6, 24, 1, 1, generator=generator, dtype=torch.float64) / 5
    x = torch.randn(DRAWS, 4, 12, 12, generator=generator, dtype=torch.float64)
    hidden = F.relu6(F.conv2d(F.relu6(F.conv2d(x, expand) + 0.3), depthwise, padding=1, groups=24))
    out = F.conv2d(hidden, project)
    measured_var = out[..., 2:-2, 2:-2].var((0, 2, 3))
    moments = RULES["conv"](_accurate_input((4, 12, 12)), weight=expand, out_shape=(24, 12, 12))
    assert moments.channel_correlation is not None
    moments = RULES["relu6"](RULES["add"](moments, 0.3, out_shape=(24, 12, 12)), out_shape=(24, 12, 12))
    moments = RULES["conv"](moments, weight=depthwise, padding=1, groups=24, out_shape=(24, 12, 12))
    moments = RULES["relu6"](moments, out_shape=(24, 12, 12))
    result = RULES["conv"](moments, weight=project, out_shape=(6, 12, 12))
    plain = Moments(moments.loc, moments.spread, moments.shape, third=moments.third, neighbours=moments.neighbours)
    independent = RULES["conv"](plain, weight=project, out_shape=(6, 12, 12))
    error = (result.var / measured_var - 1).abs()
    assert error.max() < 0.04, error
    assert (independent.var / measured_var - 1).abs().max() > 3 * error.max()


def test_channel_correlation_through_an_activation_matches_monte_carlo() -> None:
    generator = _generator(23)
    mixing = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    z = torch.randn(400_000, 3, generator=generator, dtype=torch.float64) @ mixing.T + torch.linspace(-1, 1, 5)
    covariance = torch.cov(z.T)
    std = covariance.diagonal().sqrt()
    x = Moments(z.mean(0), covariance.diagonal(), (5,), channel_correlation=covariance / torch.outer(std, std))
    from graphnorm.rules.channel_correlation import activation_correlation

    for function in (torch.relu, F.silu, torch.tanh):
        y = function(z)
        measured = torch.corrcoef(y.T)
        coefficients = hermite_coefficients(function, x.mean, x.unit_average_var)
        assert torch.allclose(activation_correlation(coefficients, x), measured, atol=0.01)


def _channel_correlation_of(samples: torch.Tensor) -> torch.Tensor:
    """The same-position channel correlation of ``[N, C, *S]`` samples, pooled over positions."""
    flat = samples.movedim(1, -1).reshape(-1, samples.shape[1])
    return torch.corrcoef(flat.T)


def test_dense_conv_of_correlated_channels_matches_monte_carlo() -> None:
    """The digits CNN's shape: one input channel expanded by a 3x3 conv to 8 correlated channels, ReLU, 2x2
    max-pool, then a dense 3x3 conv that sums the correlated channels over neighbouring positions. The first
    conv's channel correlation is exact; the dense conv's variance with the carried correlation is within 3% of
    Monte Carlo at the median over channels (channels independent: 10% off), not uniformly: two of six channels
    stay 12-14% off, where the cross-position correlation of two channels is not ``S_cd (rho_c + rho_d)/2``."""
    generator = _generator(31)
    stem = torch.randn(8, 1, 3, 3, generator=generator, dtype=torch.float64) / 3
    dense = torch.randn(6, 8, 3, 3, generator=generator, dtype=torch.float64) / 8
    x = torch.randn(DRAWS, 1, 16, 16, generator=generator, dtype=torch.float64)
    first = F.conv2d(x, stem, padding=1)
    hidden = F.max_pool2d(torch.relu(first + 0.2), 2)
    out = F.conv2d(hidden, dense, padding=1)
    moments = RULES["conv"](_accurate_input((1, 16, 16)), weight=stem, padding=1, out_shape=(8, 16, 16))
    assert torch.allclose(moments.channel_correlation, _channel_correlation_of(first[..., 2:-2, 2:-2]), atol=0.02)
    moments = RULES["relu"](RULES["add"](moments, 0.2, out_shape=(8, 16, 16)), out_shape=(8, 16, 16))
    pooled = RULES["max_pool"](moments, kernel_size=2, stride=2, out_shape=(8, 8, 8))
    result = RULES["conv"](pooled, weight=dense, padding=1, out_shape=(6, 8, 8))
    measured_var = out[..., 2:-2, 2:-2].var((0, 2, 3))
    plain = Moments(pooled.loc, pooled.spread, pooled.shape, third=pooled.third, neighbours=pooled.neighbours)
    independent = RULES["conv"](plain, weight=dense, padding=1, out_shape=(6, 8, 8))
    error = (result.var / measured_var - 1).abs()
    independent_error = (independent.var / measured_var - 1).abs()
    assert error.median() < 0.03, error
    assert independent_error.median() > 3 * error.median()
    measured_correlation = _channel_correlation_of(out[..., 2:-2, 2:-2])
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    correlation_error = (result.channel_correlation - measured_correlation)[off_diagonal].abs().mean()
    # AP2's error is all of the correlation; the carried one halves it (0.08 against 0.16 measured)
    assert correlation_error < 0.6 * measured_correlation[off_diagonal].abs().mean()


def test_kernel_cross_correlation_is_the_sum_over_taps() -> None:
    """``B[o, c, e] = sum_k W[o,c,k] V[o,c,k+e]`` against a direct loop over taps."""
    from graphnorm.rules.neighbours import kernel_cross_correlation

    generator = _generator(33)
    weight = torch.randn(3, 2, 3, 2, generator=generator, dtype=torch.float64)
    other = torch.randn(3, 2, 3, 2, generator=generator, dtype=torch.float64)
    cross = kernel_cross_correlation(weight, other)
    assert cross.shape == (3, 2, 5, 3)
    for e0, e1 in itertools.product(range(-2, 3), range(-1, 2)):
        direct = sum(weight[:, :, k0, k1] * other[:, :, k0 + e0, k1 + e1]
                     for k0, k1 in itertools.product(range(3), range(2)) if 0 <= k0 + e0 < 3 and 0 <= k1 + e1 < 2)
        assert torch.allclose(cross[:, :, e0 + 2, e1 + 1], torch.as_tensor(direct, dtype=torch.float64))


def test_a_convolution_above_the_budget_drops_the_channel_correlation(monkeypatch) -> None:
    """Above ``CORRELATION_BUDGET`` multiply-adds a dense convolution takes its input channels as independent
    (the AP2 variance with neighbour templates) instead of forming ``O(K O C^2)`` products; below, it carries
    them."""
    from graphnorm.rules.channel_correlation import correlation_affordable

    generator = _generator(35)
    channels = 96
    mixing = torch.randn(channels, 4, generator=generator, dtype=torch.float64)
    covariance = mixing @ mixing.T + torch.eye(channels, dtype=torch.float64)
    std = covariance.diagonal().sqrt()
    x = Moments(torch.zeros(channels, dtype=torch.float64), covariance.diagonal(), (channels, 10, 10),
                third=torch.zeros(channels, dtype=torch.float64),
                channel_correlation=covariance / torch.outer(std, std))
    weight = torch.randn(channels, channels, 3, 3, generator=generator, dtype=torch.float64) / 30
    plain = Moments(x.loc, x.spread, x.shape, third=x.third)
    independent = RULES["conv"](plain, weight=weight, padding=1, out_shape=(channels, 10, 10))
    assert correlation_affordable(weight)
    carried = RULES["conv"](x, weight=weight, padding=1, out_shape=(channels, 10, 10))
    assert carried.channel_correlation is not None
    assert (carried.var / independent.var - 1).abs().max() > 0.1  # the correlation matters here
    monkeypatch.setattr("graphnorm.rules.channel_correlation.CORRELATION_BUDGET", 1000)
    assert not correlation_affordable(weight)
    dropped = RULES["conv"](x, weight=weight, padding=1, out_shape=(channels, 10, 10))
    assert dropped.channel_correlation is None
    assert torch.allclose(dropped.var, independent.var)
