"""ONNX export round trips: no BatchNormalization left, onnxruntime equal to PyTorch at two batch sizes."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
import torch.nn as nn
import torchvision

import graphnorm
from graphnorm import InputStats, VerificationError
from graphnorm.loading import load_model

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
MODES = ["analytic", "reparam", "normprop", "fixed"]


class SequenceMLP(nn.Module):
    """BatchNorm1d on 2-D (N, F) and on 3-D (N, C, L) input."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(24, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(torch.flatten(self.seq(x), 1))


def _fixture(name: str):
    loaded = load_model(os.path.join(FIXTURES, name))
    shape = tuple(loaded.defaults["input_shape"])
    return loaded.model, InputStats(loaded.defaults["input_mean"], loaded.defaults["input_std"]), shape


def _round_trip(model, stats, shape, mode, tmp_path, **kwargs):
    converted = graphnorm.convert(model, stats, input_shape=shape, mode=mode)
    path = tmp_path / f"{mode}.onnx"
    result = graphnorm.export_onnx(converted, path, input_shape=shape, **kwargs)
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops
    assert result.op_counts == dict(__import__("collections").Counter(n.op_type for n in proto.graph.node))
    assert len({d["batch"] for d in result.diffs}) == 2 and all(d["ok"] for d in result.diffs)
    assert not list(tmp_path.glob(".*.tmp"))
    return result, ops


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", ["digits_cnn.pt", "tiny_mlp.pt"])
def test_fixtures_round_trip(fixture: str, mode: str, tmp_path) -> None:
    model, stats, shape = _fixture(fixture)
    _, ops = _round_trip(model, stats, shape, mode, tmp_path)
    assert ops & {"Conv", "Gemm", "MatMul"}


@pytest.mark.parametrize("mode", MODES)
def test_mlp_with_batchnorm1d_on_2d_and_3d_input(mode: str, tmp_path) -> None:
    torch.manual_seed(0)
    _round_trip(SequenceMLP(), InputStats([0.0, 1.0, -1.0, 0.5], [1.0, 2.0, 0.5, 1.0]), (1, 4, 6), mode, tmp_path)


@pytest.mark.parametrize(("name", "modes"), [("resnet18", MODES), ("mobilenet_v2", ["analytic", "reparam"]),
                                             ("vgg11_bn", ["fixed"])])
def test_torchvision_round_trip(name: str, modes: list[str], tmp_path) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    for mode in modes:
        _, ops = _round_trip(model, InputStats.standard(3), (1, 3, 32, 32), mode, tmp_path)
        assert "Conv" in ops
        (tmp_path / f"{mode}.onnx").unlink()


def test_unconverted_eval_model_exports_with_batchnorm_folded(tmp_path) -> None:
    model, _, shape = _fixture("digits_cnn.pt")
    result = graphnorm.export_onnx(model, tmp_path / "plain.onnx", input_shape=shape)
    assert "BatchNormalization" not in result.op_counts and result.op_counts["Conv"] == 2


def test_legacy_exporter_and_fixed_batch(tmp_path) -> None:
    model, stats, shape = _fixture("digits_cnn.pt")
    converted = graphnorm.convert(model, stats, input_shape=shape)
    result = graphnorm.export_onnx(converted, tmp_path / "legacy.onnx", input_shape=(3, *shape[1:]), legacy=True,
                                   dynamic_batch=False, opset=17)
    assert result.opset == 17 and [d["batch"] for d in result.diffs] == [3]


def broken_freeze(monkeypatch) -> None:
    """Make freezing subtly wrong (one weight off by 1%), as a folding bug would."""
    real = graphnorm.export.freeze

    def wrong(*args, **kwargs):
        frozen = real(*args, **kwargs)
        with torch.no_grad():
            next(p for p in frozen.parameters() if p.dim() > 1).mul_(1.01)
        return frozen

    monkeypatch.setattr(graphnorm.export, "freeze", wrong)


def test_verification_catches_a_wrong_graph_and_leaves_no_file(tmp_path, monkeypatch) -> None:
    model, stats, shape = _fixture("digits_cnn.pt")
    converted = graphnorm.convert(model, stats, input_shape=shape)
    target = tmp_path / "wrong.onnx"
    broken_freeze(monkeypatch)
    with pytest.raises(VerificationError, match="max abs"):
        graphnorm.export_onnx(converted, target, input_shape=shape)
    assert not target.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    result = graphnorm.export_onnx(converted, target, input_shape=shape)
    assert all(d["max_abs"] <= 1e-5 + 2 * d["float32_rounding"] + 1e-4 for d in result.diffs)


def test_batch_statistics_only_batchnorm_cannot_be_frozen_unconverted(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(graphnorm.GraphnormError, match="convert the model"):
        graphnorm.export_onnx(model, tmp_path / "x.onnx", input_shape=(1, 1, 5, 5))
    assert not list(tmp_path.iterdir())


def test_freezing_needs_no_moment_rules(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(36)).eval()
    result = graphnorm.export_onnx(model, tmp_path / "ln.onnx", input_shape=(1, 1, 5, 5))
    assert "BatchNormalization" not in result.op_counts and "Conv" in result.op_counts


@pytest.mark.parametrize("mode", ["analytic", "reparam", "normprop"])
def test_readme_onnx_file_computes_what_the_original_computes(mode: str, tmp_path) -> None:
    """The README's main job: the exported digits model against the original PyTorch model (running
    statistics), through onnxruntime, on the 1797 sklearn digits."""
    import onnxruntime
    from click.testing import CliRunner
    from sklearn.datasets import load_digits

    from graphnorm.cli import main

    path = tmp_path / "digits.onnx"
    result = CliRunner().invoke(main, ["convert", os.path.join(FIXTURES, "digits_cnn.pt"), str(path), "--mode", mode,
                                       "--input-data", os.path.join(FIXTURES, "digits_sample.npz")])
    assert result.exit_code == 0, result.output
    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    original = load_model(os.path.join(FIXTURES, "digits_cnn.pt")).model.eval()
    with torch.no_grad():
        reference = original(images)
    assert (exported.argmax(1) == reference.argmax(1)).double().mean() >= 0.999
    relative = (exported - reference).norm(dim=1) / reference.norm(dim=1)
    assert relative.max() < 1e-4
