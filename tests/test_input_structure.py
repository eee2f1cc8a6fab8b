"""Per-position input statistics and the input correlation template: estimated right from data (against direct
numpy computations), and used right by the linear rules (against Monte Carlo on correlated fields)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphnorm
from graphnorm import InputStats, InputStatsError
from graphnorm.moments import Moments
from graphnorm.rules.affine import conv, linear
from graphnorm.zoo import DigitsCNN


def correlated_field(draws: int, channels: int, size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A stationary correlated Gaussian field (white noise blurred and mixed across channels), then scaled
    and shifted per position, so its correlation is stationary and its mean and variance are not."""
    generator = torch.Generator().manual_seed(seed)
    dims = len(size)
    noise = torch.randn((draws, channels, *tuple(s + 2 for s in size)), generator=generator, dtype=torch.float64)
    blur = torch.tensor([0.3, 1.0, 0.3], dtype=torch.float64)
    kernel = blur
    for _ in range(dims - 1):
        kernel = kernel.unsqueeze(-1) * blur
    mixing = torch.eye(channels, dtype=torch.float64) + 0.6 * torch.ones(channels, channels).triu(1).double()
    weight = mixing.reshape(channels, channels, *(1,) * dims) * kernel
    field = {1: F.conv1d, 2: F.conv2d}[dims](noise, weight)
    ramp = torch.linspace(0.5, 2.0, size[-1], dtype=torch.float64)
    shift = torch.linspace(-1.0, 1.0, size[0], dtype=torch.float64).reshape((-1,) + (1,) * (dims - 1))
    return field * ramp + shift


def test_per_position_maps_match_numpy_and_stream() -> None:
    x = correlated_field(3000, 2, (5, 6))
    stats = InputStats.from_data(x, per_position=True)
    array = x.numpy()
    assert np.allclose(stats.mean_map.numpy(), array.mean(0))
    assert np.allclose(stats.var_map.numpy(), array.var(0))
    assert np.allclose(stats.mean.numpy(), array.mean((0, 2, 3)))  # the channel moments are the mixture
    assert np.allclose(stats.var.numpy(), array.var((0, 2, 3)))
    streamed = InputStats.from_data([(batch, 0) for batch in torch.split(x, 700)], per_position=True,
                                    patch_covariance=3)
    whole = InputStats.from_data(x, per_position=True, patch_covariance=3)
    assert torch.allclose(streamed.var_map, whole.var_map) and torch.allclose(streamed.correlation, whole.correlation)


@pytest.mark.parametrize("per_position", [True, False])
def test_correlation_template_matches_a_direct_estimate(per_position: bool) -> None:
    x = correlated_field(4000, 2, (6, 7), seed=1)
    stats = InputStats.from_data(x, per_position=per_position, patch_covariance=3)
    array = x.numpy()
    if per_position:
        center, scale = array.mean(0), array.std(0)
    else:
        center = np.broadcast_to(array.mean((0, 2, 3))[:, None, None], array.shape[1:])
        scale = np.broadcast_to(array.std((0, 2, 3))[:, None, None], array.shape[1:])
    for c, d, dy, dx in [(0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 1, -2), (1, 1, -2, 2), (0, 1, 2, 1)]:
        rows = slice(max(0, -dy), 6 - max(0, dy)), slice(max(0, dy), 6 + min(0, dy))
        cols = slice(max(0, -dx), 7 - max(0, dx)), slice(max(0, dx), 7 + min(0, dx))
        a = array[:, c, rows[0], cols[0]] - center[c, rows[0], cols[0]]
        b = array[:, d, rows[1], cols[1]] - center[d, rows[1], cols[1]]
        expected = (a * b).mean(0).mean() / (scale[c, rows[0], cols[0]] * scale[d, rows[1], cols[1]]).mean()
        assert stats.correlation[c, d, dy + 2, dx + 2].item() == pytest.approx(expected, abs=1e-9)
    assert stats.correlation[0, 0, 2, 2].item() == pytest.approx(1.0)


def test_feature_vectors_get_the_full_correlation_matrix() -> None:
    x = correlated_field(2000, 1, (12,)).flatten(1)
    stats = InputStats.from_data(x, patch_covariance=1)
    assert stats.correlation.shape == (12, 12)
    assert np.allclose(stats.correlation.numpy(), np.corrcoef(x.numpy().T))


def test_rich_statistics_are_checked_against_the_input() -> None:
    stats = InputStats.from_data(correlated_field(50, 2, (5, 6)), per_position=True, patch_covariance=2)
    with pytest.raises(InputStatsError, match=r"per position for inputs of size \(5, 6\)"):
        stats.validate_for((1, 2, 8, 8))
    with pytest.raises(InputStatsError, match="measure on that data"):
        stats.sample((4, 2, 5, 6))
    with pytest.raises(InputStatsError, match="patch_covariance must be a kernel width"):
        InputStats.from_data(torch.zeros(4, 1, 3, 3), patch_covariance=0)
    with pytest.raises(InputStatsError, match="one size"):
        InputStats.from_data([torch.randn(4, 1, 3, 3), torch.randn(4, 1, 4, 4)], per_position=True)
    with pytest.raises(InputStatsError, match=r"correlation must be \[C, C, 2r\+1"):
        InputStats.standard(2).with_correlation(torch.ones(2, 2, 4))
    drawn = InputStats.from_data(correlated_field(50, 2, (5, 6)), per_position=True).sample((3000, 2, 5, 6))
    assert drawn.shape == (3000, 2, 5, 6)


CONV_CASES = [  # (spatial size, stride, padding, dilation, groups, channels)
    ((9, 8), 1, 1, 1, 1, 2),
    ((9, 8), 2, 1, 1, 1, 2),
    ((9, 8), 1, 2, 2, 1, 2),
    ((9, 8), 1, 0, 1, 2, 2),
    ((9, 8), 1, "same", 1, 1, 2),
    ((16,), 1, 1, 1, 1, 3),
]


@pytest.mark.parametrize("size, stride, padding, dilation, groups, channels", CONV_CASES)
def test_conv_of_correlated_inputs_matches_monte_carlo(size, stride, padding, dilation, groups, channels) -> None:
    """Per unit the correlated rule is exact for a field with stationary correlation (up to Monte-Carlo error);
    the independent rule is far off on the same field."""
    x = correlated_field(40_000, channels, size, seed=2)
    stats = InputStats.from_data(x, per_position=True, patch_covariance=5)
    torch.manual_seed(3)
    weight = torch.randn(4, channels // groups, *(3,) * len(size), dtype=torch.float64)
    y = {1: F.conv1d, 2: F.conv2d}[len(size)](x, weight, None, stride, padding, dilation, groups)
    measured = y.std(0)
    params = dict(weight=weight, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  out_shape=tuple(y.shape[1:]))
    shape = tuple(stats.mean_map.shape)
    correlated = conv(Moments(stats.mean_map, stats.var_map, shape, correlation=stats.correlation), **params)
    independent = conv(Moments(stats.mean_map, stats.var_map, shape), **params)
    error = ((correlated.spread.sqrt() - measured) / measured).abs().max().item()
    assert error < 0.025  # Monte-Carlo standard error of a std from 40k draws: 0.35%
    assert ((independent.spread.sqrt() - measured) / measured).abs().max().item() > 0.1
    assert torch.allclose(correlated.loc, y.mean(0), atol=0.02 * measured.max().item())


def test_per_channel_conv_of_correlated_inputs_matches_monte_carlo_inside() -> None:
    """Without maps the rule is the stationary (border-free) form: exact at interior positions."""
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(40_000, 2, 12, 12, generator=generator, dtype=torch.float64)
    x = F.avg_pool2d(noise, 3, 1) * 3 + torch.tensor([0.5, -1.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    stats = InputStats.from_data(x, patch_covariance=3)
    weight = torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64)
    y = F.conv2d(x, weight, padding=1)
    moments = conv(Moments(stats.mean, stats.var, (2, 10, 10), correlation=stats.correlation), weight=weight,
                   padding=1, out_shape=(3, 10, 10))
    interior = y[:, :, 1:-1, 1:-1].transpose(0, 1).reshape(3, -1)
    assert torch.allclose(moments.spread.sqrt(), interior.std(1), rtol=0.02)


def test_linear_of_correlated_features_is_exact() -> None:
    x = correlated_field(100_000, 1, (10,), seed=5).flatten(1)
    stats = InputStats.from_data(x, patch_covariance=1)
    weight = torch.randn(6, 10, dtype=torch.float64)
    moments = linear(Moments(stats.mean, stats.var, (10,), correlation=stats.correlation), weight=weight,
                     out_shape=(6,))
    assert torch.allclose(moments.spread.sqrt(), (x @ weight.T).std(0, unbiased=False), rtol=1e-6)


def test_first_layer_of_a_real_network_on_real_data_is_nearly_exact() -> None:
    """Digits: with per-position maps and the patch correlation, the first conv's analytic per-channel std is
    within 1% of the one measured on the very data the statistics came from (the rest: the correlation of
    real digits is not quite stationary); per-channel input statistics miss it by more than 5%."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    first = model.features[0]
    with torch.no_grad():
        measured = first(images).transpose(0, 1).reshape(16, -1).double().std(1, unbiased=False)
    errors = {}
    for name, stats in {"rich": InputStats.from_data(images, per_position=True, patch_covariance=3),
                        "plain": InputStats.from_data(images)}.items():
        table = graphnorm.propagate(model, stats, (1, 1, 8, 8))
        errors[name] = ((table["features_0"].std.double() - measured) / measured).abs().max().item()
    assert errors["rich"] < 0.01 and errors["plain"] > 0.05


def test_data_free_recalibration_of_a_trained_network_with_rich_input_statistics() -> None:
    """What the statistics are for: fixed mode without calibration rewrites every BatchNorm from the analytic
    statistics alone. On the trained digits CNN and the real digits, per-channel input statistics leave it
    far from the original; per-position maps with the patch correlation (per unit) bring it back."""
    from sklearn.datasets import load_digits

    from graphnorm.loading import load_model

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    model = load_model(os.path.join(os.path.dirname(__file__), "..", "fixtures", "digits_cnn.pt")).model.eval()
    accuracies = {}
    for name, stats in {"rich": InputStats.from_data(images, per_position=True, patch_covariance=3),
                        "plain": InputStats.from_data(images)}.items():
        fixed = graphnorm.convert(model, stats, input_shape=(1, 1, 8, 8), mode="fixed", calibrate="none",
                                  spatial=name == "rich", agreement_samples=0).eval()
        with torch.no_grad():
            accuracies[name] = (fixed(images).argmax(1) == labels).float().mean().item()
    with torch.no_grad():
        original = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracies["rich"] >= original - 0.01 and accuracies["plain"] < 0.5
