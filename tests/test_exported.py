"""torch.export capture: ExportedPrograms through the Python API and the CLI, the export fallback of tracing,
and .pt2 files as data (the ATen spellings case by case: tests/rules/test_aten_spellings.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from click.testing import CliRunner
from test_calibration import relative_errors, with_running_statistics

import graphnorm
from graphnorm import InputStats, TraceError
from graphnorm.cli import main


def export(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    """What a user does: torch.export with a dynamic batch dim."""
    example = torch.randn((2, *shape[1:]), dtype=dtype)
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.fixture(scope="module")
def trained_resnet() -> nn.Module:
    torch.manual_seed(0)
    return with_running_statistics(torchvision.models.resnet18(weights=None, num_classes=10), seed=0).eval()


SHAPE = (1, 3, 32, 32)


@pytest.mark.parametrize("mode", ["analytic", "reparam", "normprop"])
def test_an_exported_program_converts_to_what_the_original_computes(trained_resnet, mode: str) -> None:
    program = export(trained_resnet, SHAPE)
    converted = graphnorm.convert(program, InputStats.standard(3), input_shape=SHAPE, mode=mode,
                                  agreement_samples=0)
    log = converted.graphnorm_log
    assert log.capture == "torch.export"
    assert log.counts == {mode: 20} and log.calibrated == 20 and not log.sampled
    # the layers are modules again, under the original paths
    assert {r.module_path for r in log.rewritten} == {n for n, m in trained_resnet.named_modules()
                                                      if isinstance(m, nn.BatchNorm2d)}
    for batch in (1, 5):  # the batch dim stayed dynamic
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert relative_errors(converted(x), trained_resnet(x)).max() < 1e-4


def test_export_and_symbolic_tracing_give_the_same_conversion(trained_resnet) -> None:
    stats = InputStats([0.5, -0.2, 0.1], [1.0, 2.0, 0.5])
    for calibrate in ("none", "running"):
        from_program = graphnorm.convert(export(trained_resnet, SHAPE), stats, input_shape=SHAPE,
                                         calibrate=calibrate, agreement_samples=0).train()
        traced = graphnorm.convert(trained_resnet, stats, input_shape=SHAPE, calibrate=calibrate,
                                   agreement_samples=0).train()
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(from_program(x), traced(x), rtol=1e-5, atol=1e-5)


def test_core_aten_after_decompositions(trained_resnet) -> None:
    """run_decompositions() gives aten.convolution, aten._native_batch_norm_legit_no_training, aten.addmm."""
    program = export(trained_resnet, SHAPE).run_decompositions()
    targets = {str(n.target) for n in program.graph.nodes}
    assert "aten._native_batch_norm_legit_no_training.default" in targets and "aten.convolution.default" in targets
    converted = graphnorm.convert(program, InputStats.standard(3), input_shape=SHAPE, mode="reparam",
                                  agreement_samples=0)
    assert converted.graphnorm_log.counts == {"reparam": 20} and not converted.graphnorm_log.sampled
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert relative_errors(converted(x), trained_resnet(x)).max() < 1e-4


def test_a_training_mode_program_is_batch_independent_and_left_alone() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.BatchNorm2d(4)).train()
    program = export(model, (1, 3, 8, 8))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    converted = graphnorm.convert(program, InputStats.standard(3), input_shape=(1, 3, 8, 8), agreement_samples=0)
    assert converted.training and converted.graphnorm_log.counts == {"analytic": 2}
    assert not any(n.target == torch.ops.aten.add_.Tensor for n in converted.graph.nodes)  # no batch counter
    x = torch.randn(6, 3, 8, 8)
    alone = torch.cat([converted(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(converted(x), alone, rtol=1e-5, atol=1e-6)
    for key, value in program.state_dict.items():
        assert torch.equal(value, before[key]), key


class NumpyConstant(nn.Module):
    """``x.new_tensor(numpy array)`` in forward: symbolic tracing cannot capture it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * y.new_tensor(np.linspace(0.5, 2.0, 8, dtype=np.float32)).view(1, 8, 1, 1)


def test_tracing_falls_back_to_torch_export() -> None:
    torch.manual_seed(2)
    model = with_running_statistics(NumpyConstant(), seed=2).eval()
    with pytest.raises(TraceError):
        graphnorm.trace(model)  # without the input shape there is no fallback
    converted = graphnorm.convert(model, InputStats.standard(3), input_shape=(1, 3, 8, 8))
    assert converted.graphnorm_log.capture == "torch.export (symbolic tracing failed)"
    assert converted.graphnorm_log.counts == {"analytic": 1} and converted.graphnorm_log.calibrated == 1
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert relative_errors(converted(x), model(x)).max() < 1e-5


class DataDependent(NumpyConstant):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.relu() if y.sum() > 0 else y


def test_data_dependent_control_flow_names_both_capture_failures() -> None:
    with pytest.raises(TraceError) as failure:
        graphnorm.convert(DataDependent(), InputStats.standard(3), input_shape=(1, 3, 8, 8))
    message = str(failure.value)
    assert "torch.fx could not trace" in message and "y.sum() > 0" in message
    assert "torch.export.export(strict=False) could not capture the model either" in message


# -- .pt2 files ------------------------------------------------------------------------------------------------------
def test_pt2_file_is_a_model_for_the_cli_only_when_trusted(trained_resnet, tmp_path) -> None:
    path = tmp_path / "resnet.pt2"
    torch.export.save(export(copy.deepcopy(trained_resnet), SHAPE), path)
    untouched = path.read_bytes()
    refused = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "r.onnx"), "--input-shape", "1,3,32,32"])
    assert refused.exit_code == 2 and not (tmp_path / "r.onnx").exists()
    assert "torch.export program" in refused.output and "pickled Python object" not in refused.output
    assert "--trust-pickle" in refused.output
    result = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "r.onnx"), "--input-shape", "1,3,32,32",
                                       "--trust-pickle", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["conversion"]["capture"] == "torch.export"
    assert summary["conversion"]["counts"] == {"analytic": 20} and summary["conversion"]["calibration"] == "running"
    assert summary["export"]["diffs"] and "BatchNormalization" not in summary["export"]["op_counts"]
    assert path.read_bytes() == untouched


@pytest.mark.parametrize("name", ["timm:ghostnet_050", "torchvision:shufflenet_v2_x0_5"])
def test_real_families_convert_the_same_from_their_exported_program(name: str) -> None:
    """GhostNet (ghost-module slices x[:, :c], squeeze-excitation means, hard sigmoid) and ShuffleNetV2 (the
    channel shuffle as view/transpose): the program converts with closed-form rules only, to the model that
    converting the module gives."""
    import timm

    source, _, model_name = name.partition(":")
    torch.manual_seed(0)
    model = (timm.create_model(model_name, pretrained=False) if source == "timm"
             else torchvision.models.get_model(model_name, weights=None)).eval()
    shape = (1, 3, 64, 64)
    from_program = graphnorm.convert(export(model, shape), InputStats.standard(3), input_shape=shape,
                                     fallback="error", agreement_samples=0)
    traced = graphnorm.convert(model, InputStats.standard(3), input_shape=shape, agreement_samples=0)
    assert from_program.graphnorm_log.counts == traced.graphnorm_log.counts
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(from_program(x), traced(x), rtol=1e-4, atol=1e-5)
