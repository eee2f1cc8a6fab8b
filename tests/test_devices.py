"""A converted model moved with .to(device) or .to(dtype) runs there: statistics, their constants and noise
follow the parameters. The references: the same model on the CPU in float32 (values), shape inference (meta)."""

from __future__ import annotations

import pytest
import torch
from conversion_models import DigitsCNN

import graphnorm

STATS = graphnorm.InputStats.standard(1)
MODES = [("analytic", {}), ("reparam", {}), ("normprop", {}), ("fixed", {}), ("analytic", {"stochastic_batch": 8}),
         ("analytic", {"spatial": True})]
IDS = ["analytic", "reparam", "normprop", "fixed", "stochastic", "spatial"]
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


def _convert(mode: str, kwargs: dict) -> graphnorm.ConvertedModule:
    torch.manual_seed(0)
    return graphnorm.convert(DigitsCNN(), STATS, input_shape=(1, 1, 8, 8), mode=mode, agreement_samples=0, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode, kwargs", MODES, ids=IDS)
def test_a_model_moved_to_another_device_runs_there(mode: str, kwargs: dict, device: str) -> None:
    model = _convert(mode, kwargs)
    reference = [model.train(training)(X).detach() for training in (False,)]
    moved = model.to(device)
    for training in (True, False):
        moved.train(training)
        output = moved(X.to(device))
        assert output.device.type == device and output.shape == (4, 10)
        if training:
            output.sum().backward()
            grads = [p.grad for p in moved.parameters() if p.grad is not None]
            assert grads and all(grad.device.type == device for grad in grads)
    if device != "meta":
        torch.testing.assert_close(moved.eval()(X.to(device)).cpu(), reference[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, kwargs", MODES, ids=IDS)
def test_float64_model_matches_float32_and_half_models_keep_float32_statistics(mode: str, kwargs: dict) -> None:
    model = _convert(mode, kwargs).eval()
    want = model(X).detach()
    double = _convert(mode, kwargs).double().eval()
    torch.testing.assert_close(double(X.double()).float(), want, rtol=1e-4, atol=1e-5)
    bf16 = _convert(mode, kwargs).to(torch.bfloat16)
    for training in (True, False):
        bf16.train(training)
        output = bf16(X.to(torch.bfloat16))
        assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()
    program = bf16.statistics_program
    if program is not None:  # statistics in float32 whatever the parameters' dtype
        assert program.input_mean.dtype == torch.float32
        statistics = program(*bf16.statistics_inputs())
        assert all(t.dtype == torch.float32 for t in statistics)
    torch.testing.assert_close(bf16.eval()(X.to(torch.bfloat16)).float(), want, rtol=0.1, atol=0.1)


def test_errors_name_their_real_cause_on_the_wrong_device() -> None:
    model = _convert("analytic", {}).to("meta")
    with pytest.raises(RuntimeError, match=r"meta|device"):
        model(X)  # a CPU input to a meta model: torch's own device message, not "check input_shape"
