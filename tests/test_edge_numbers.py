"""Numbers at the edges: float64, float16 and bfloat16 models, huge and tiny weight scales, dead ReLU channels
(zero variance) and constant input channels give no NaN or inf in any mode, in training, in eval and in the
exported ONNX graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphnorm
from graphnorm import InputStats
from graphnorm.export import export_onnx

MODES = ["analytic", "reparam", "normprop", "fixed"]
SHAPE = (1, 2, 8, 8)


def network() -> nn.Module:
    """Conv and Linear BatchNorm sites (2d and 1d), ReLU and sigmoid, pooling and a flatten."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def with_dead_channels(model: nn.Module) -> nn.Module:
    """The first conv's channels 0-2 never fire: bias far below any input (the ReLU after gives exactly 0)."""
    with torch.no_grad():
        model[0].bias[:3] = -1e4
        model[0].weight[:3] *= 1e-3
    return model


def scaled(factor: float):
    def scale(model: nn.Module) -> nn.Module:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.weight.mul_(factor)
        return model
    return scale


def trained_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics from a few batches of ``x`` (so that calibration sees trained BatchNorms)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def check_train_and_eval(converted: nn.Module, x: torch.Tensor) -> None:
    converted.train()
    out = converted(x)
    out.float().square().mean().backward()
    assert all_finite(out), "training output"
    bad = [name for name, p in converted.named_parameters() if p.grad is not None and not all_finite(p.grad)]
    assert not bad, f"non-finite gradients: {bad}"
    converted.eval()
    with torch.no_grad():
        assert all_finite(converted(x)), "eval output"


EDGES = {
    "plain": lambda m: m,
    "tiny weights (1e-6)": scaled(1e-6),
    "huge weights (1e6)": scaled(1e6),
    "dead ReLU channels": with_dead_channels,
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("edge", list(EDGES))
def test_float32_edges_train_eval_and_export_finite(edge, mode, tmp_path) -> None:
    x = torch.randn(8, *SHAPE[1:], generator=torch.Generator().manual_seed(1))
    x[:, 1] = 0.5  # a constant input channel
    stats = InputStats([0.0, 0.5], [1.0, 0.0])
    original = trained_statistics(EDGES[edge](network()), x)
    converted = graphnorm.convert(original, stats, input_shape=SHAPE, mode=mode)
    check_train_and_eval(converted, x)
    result = export_onnx(converted, tmp_path / "m.onnx", input_shape=SHAPE, rtol=1e-3, atol=1e-4)
    assert all(all_finite(torch.as_tensor(d["max_abs"])) for d in result.diffs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_low_and_high_precision_models(dtype, mode) -> None:
    """A model in another dtype converts and trains there with finite numbers; its statistics are computed in
    float32 or better (float64 stays float64)."""
    x = torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    original = trained_statistics(network(), x).to(dtype)
    converted = graphnorm.convert(original, InputStats.standard(2), input_shape=SHAPE, mode=mode)
    check_train_and_eval(converted, x.to(dtype))
    program = converted.statistics_program
    if program is not None:
        statistics = program.train()(*converted.statistics_inputs())
        expected = torch.float64 if dtype == torch.float64 else torch.float32
        assert all(t.dtype == expected for t in statistics if t.is_floating_point())
