"""A representative slice of benchmarks/zoo.py (docs/models.md) within CI time: real timm and torchvision
architectures with random weights, at 64x64, through convert, a batch-independence check, closed-form coverage
and, for two of them, ONNX export verified with onnxruntime."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision

import graphnorm
from graphnorm import InputStats

SHAPE = (1, 3, 64, 64)
MODELS = {  # what each brings that ResNet-18 does not
    "timm:efficientnet_b0": "squeeze-excitation means, SiLU, depthwise convs, DropPath",
    "timm:tf_mobilenetv3_small_minimal_100": "TensorFlow same padding",
    "timm:ghostnet_050": "cheap-operation slices, hard sigmoid gates",
    "timm:skresnet18": "selective-kernel attention: stack, sum, softmax (sampled)",
    "torchvision:shufflenet_v2_x0_5": "channel shuffle (view, transpose), chunk",
    "torchvision:mobilenet_v3_small": "hardswish, squeeze-excitation via adaptive pooling",
}


def _build(entry: str) -> torch.nn.Module:
    source, name = entry.split(":")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "timm":
            model = timm.create_model(name, pretrained=False)
        else:
            model = torchvision.models.get_model(name, weights=None)
    for module in model.modules():  # train-mode outputs must be deterministic to compare batch layouts
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.eval()


@pytest.mark.parametrize("entry", list(MODELS), ids=list(MODELS))
def test_zoo_model_converts_and_is_batch_independent(entry: str) -> None:
    model = _build(entry)
    converted = graphnorm.convert(model, InputStats.standard(3), input_shape=SHAPE, agreement_samples=0)
    batchnorms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(converted.graphnorm_log.rewritten) == batchnorms
    converted.train()
    x = torch.randn(3, *SHAPE[1:])
    batch = converted(x)
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch, torch.cat([converted(x[i:i + 1]) for i in range(3)]), rtol=1e-4, atol=1e-5)
    if "sampled" not in MODELS[entry]:  # closed-form rules only
        graphnorm.propagate(model, InputStats.standard(3), SHAPE, batch_norm="analytic", fallback="error")
    else:
        assert converted.graphnorm_log.sampled


@pytest.mark.parametrize("entry", ["timm:efficientnet_b0", "torchvision:shufflenet_v2_x0_5"])
def test_zoo_model_exports_verified(entry: str, tmp_path) -> None:
    converted = graphnorm.convert(_build(entry), InputStats.standard(3), input_shape=SHAPE, agreement_samples=0)
    result = graphnorm.export_onnx(converted, tmp_path / "model.onnx", input_shape=SHAPE)
    assert result.diffs and max(d["max_abs"] for d in result.diffs) < 1e-3
