"""Whole-network properties of moment propagation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import graphnorm
from graphnorm import InputStats, MomentPropagator, UnsupportedOpError
from graphnorm.compare import compare_batchnorm_inputs


def conv_bn_relu_chain(depth: int = 5, width: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers)


def relative_std_errors(model: nn.Module, stats: InputStats, shape, *, spatial: bool, batches: int = 8,
                        ) -> dict[str, torch.Tensor]:
    """Per-channel |analytic std - measured std| / measured std at every BatchNorm input, with every
    BatchNorm recalibrated to the analytic statistics (the normalization graphnorm would apply)."""
    generator = torch.Generator().manual_seed(0)
    data = (stats.sample((32, *shape[1:]), generator=generator) for _ in range(batches))
    return {c.node: c.relative_error for c in compare_batchnorm_inputs(model, stats, shape, data, spatial=spatial)}


@pytest.mark.parametrize("spatial", [False, True])
def test_conv_bn_relu_chain_matches_measured_moments(spatial: bool) -> None:
    torch.manual_seed(0)
    stats = InputStats([0.3, -0.2, 0.1], [1.0, 0.5, 2.0])
    errors = relative_std_errors(conv_bn_relu_chain(), stats, (1, 3, 32, 32), spatial=spatial)
    medians = torch.stack([e.median() for e in errors.values()])
    assert medians.median() < 0.05, medians


def test_per_unit_mode_is_exact_at_borders_where_per_channel_is_not() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    stats = InputStats.standard(3)
    per_unit = relative_std_errors(model, stats, (1, 3, 4, 4), spatial=True)
    per_channel = relative_std_errors(model, stats, (1, 3, 4, 4), spatial=False)
    first, last = list(per_unit)
    # The first conv sees independent inputs, so per unit it is exact up to Monte-Carlo noise; per channel it
    # ignores that 12 of 16 positions see zero padding.
    assert per_unit[first].median() < 0.02 < 0.1 < per_channel[first].median()
    # The second sums correlated neighbours (independence breaks), yet per unit stays far closer.
    assert per_unit[last].median() < 0.5 * per_channel[last].median()


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2"])
@pytest.mark.parametrize("spatial", [False, True])
def test_torchvision_models_propagate(name: str, spatial: bool) -> None:
    model = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():
        table = graphnorm.propagate(model, InputStats.standard(3), (1, 3, 64, 64), spatial=spatial,
                                    batch_norm="analytic")
    assert table["output"].shape == (1000,)
    for name_, moments in table.items():
        assert torch.isfinite(moments.mean).all() and torch.isfinite(moments.var).all(), name_
        assert (moments.var >= 0).all(), name_
    batch_norms = [n for n, info in table.info.items() if info.op == "batch_norm"]
    assert batch_norms


def test_propagation_is_differentiable_with_respect_to_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 2),
                          nn.Sigmoid()).double()
    propagator = MomentPropagator(model, (1, 2, 6, 6))
    stats = InputStats([0.5, -0.5], [1.0, 2.0])
    params = [model[0].weight, model[0].bias, model[4].weight]

    def output_moments(*weights):
        with torch.nn.utils.stateless._reparametrize_module(
                model, {"0.weight": weights[0], "0.bias": weights[1], "4.weight": weights[2]}):
            out = propagator.run(stats)["output"]
        return out.mean, out.var

    assert torch.autograd.gradcheck(output_moments, tuple(p.detach().clone().requires_grad_() for p in params))


def test_unsupported_ops_are_all_listed_at_once() -> None:
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.soft = nn.Softsign()

        def forward(self, x):
            return torch.exp(self.soft(x)).sort(dim=1).values

    with pytest.raises(UnsupportedOpError) as info:
        graphnorm.propagate(Odd(), InputStats.standard(4), (1, 4), fallback="error")
    message = str(info.value)
    assert "4 op(s)" in message  # Softsign, exp, sort and the .values of sort's result
    assert "Softsign" in message and "module 'soft'" in message
    assert "exp" in message and "Tensor.sort" in message
    assert "@graphnorm.moment_rule" in message and "register_op" in message


def test_user_registered_rule_for_a_leaf_module() -> None:
    class Scale(nn.Module):
        def forward(self, x):
            return 3 * x

    graphnorm.register_op(Scale, "test_scale")

    @graphnorm.moment_rule("test_scale")
    def scale_rule(x, *, module, out_shape):
        return graphnorm.Moments(3 * x.loc, 9 * x.spread, x.shape)

    try:
        model = nn.Sequential(Scale(), nn.ReLU())
        table = graphnorm.propagate(model, InputStats([1.0], [2.0]), (1, 1), leaf_modules=[Scale])
        assert table["_0"].mean.item() == 3.0 and table["_0"].var.item() == 36.0
    finally:
        graphnorm.RULES.pop("test_scale")


def test_size_queries_and_reshapes_use_the_batch_of_input_shape() -> None:
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.view(y.size(0), y.shape[1], -1).flatten(1)

    table = graphnorm.propagate(Head(), InputStats.standard(3), (5, 3, 6, 6))
    assert table["output"].shape == (64,)


def test_table_is_ordered_and_readable() -> None:
    model = conv_bn_relu_chain(depth=2)
    table = graphnorm.propagate(model, InputStats.standard(3), (1, 3, 8, 8))
    assert next(iter(table)) == "input_1" and list(table)[-1] == "output"
    text = repr(table)
    assert "batch_norm" in text and "std max" in text and len(text.splitlines()) == len(table) + 2


def test_bad_input_shape_is_reported() -> None:
    with pytest.raises(graphnorm.GraphnormError, match="does not run on an input of shape"):
        graphnorm.propagate(conv_bn_relu_chain(1), InputStats.standard(3), (1, 3, 8))
    with pytest.raises(graphnorm.GraphnormError, match=r"expected input.* to have 3 channels"):
        graphnorm.propagate(conv_bn_relu_chain(1), InputStats.standard(4), (1, 4, 8, 8))
    with pytest.raises(graphnorm.InputStatsError, match="4 channels but input_shape"):
        graphnorm.propagate(conv_bn_relu_chain(1), InputStats.standard(4), (1, 3, 8, 8))
