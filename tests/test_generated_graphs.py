"""Properties of conversion on generated networks (tests/generated_networks.py): in every mode the converted
model is batch independent in training and finite; fixed mode equals the original in eval with the analytic
statistics written into its running statistics (graphnorm.recalibrate.recalibrate_batchnorm); the exported ONNX graph
matches torch in onnxruntime.

CI runs a modest number of examples; ``GRAPHNORM_GENERATED_EXAMPLES=3000 python -m pytest
tests/test_generated_graphs.py`` is the long run recorded in docs/benchmarks.md."""

from __future__ import annotations

import os

import torch
from generated_networks import networks
from hypothesis import HealthCheck, given, settings

import graphnorm
from graphnorm import InputStats
from graphnorm.export import export_onnx
from graphnorm.recalibrate import recalibrate_batchnorm

EXAMPLES = int(os.environ.get("GRAPHNORM_GENERATED_EXAMPLES", "12"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 12,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MODES = ("analytic", "reparam", "normprop", "fixed")


def batch(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(generated=networks())
def test_every_mode_is_batch_independent_and_finite(generated) -> None:
    network, shape, spec = generated
    x = batch(shape, 5, 0)
    for mode in MODES:
        converted = graphnorm.convert(network, InputStats.standard(shape[1]), input_shape=shape, mode=mode,
                                      agreement_samples=0).train()
        together = converted(x)
        alone = torch.cat([converted(x[i:i + 1]) for i in range(len(x))])
        assert torch.isfinite(together).all(), f"{mode}: non-finite output for {spec}"
        torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5, msg=f"{mode}: batch dependent: {spec}")
        together.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in converted.parameters() if p.grad is not None), spec


@SETTINGS
@given(generated=networks())
def test_fixed_mode_is_the_recalibrated_original(generated) -> None:
    network, shape, spec = generated
    stats = InputStats.standard(shape[1])
    fixed = graphnorm.convert(network, stats, input_shape=shape, mode="fixed", calibrate="none",
                              agreement_samples=0).eval()
    recalibrated = recalibrate_batchnorm(network, stats, shape).eval()
    x = batch(shape, 4, 1)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), recalibrated(x), rtol=1e-4, atol=1e-5, msg=spec)


@settings(SETTINGS, max_examples=max(3, EXAMPLES // 4))
@given(generated=networks())
def test_export_matches_onnxruntime(generated, tmp_path_factory) -> None:
    network, shape, spec = generated
    converted = graphnorm.convert(network, InputStats.standard(shape[1]), input_shape=shape, mode="analytic",
                                  agreement_samples=0)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(converted, path, input_shape=shape, rtol=1e-4, atol=1e-5)
    assert all(d["ok"] for d in result.diffs), spec
