"""The statistics program a conversion records (fused forms, kernel moments with workspaces, direct calls)
against the reference: the same conversion recorded with fusion off and run the way the compiler sees it
(every rule's own code, the kernel moments' plain formula, autograd for every gradient), in float64, at
weights other than those recorded. Values and gradients of every parameter to 1e-10 relative, per mode, on
a ResNet-like and a mobile-like network (depthwise, ReLU6, Hardswish, squeeze-excitation, SiLU, GELU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conversion_models import DigitsCNN, TinyMobile, TinyResNet
from references import plain_formulas

import graphnorm
from graphnorm.rules.fusion import fusion

STATS3 = graphnorm.InputStats(torch.tensor([0.3, -0.2, 0.1]), torch.tensor([1.2, 0.8, 1.0]))
MODELS = {"resnet": (TinyResNet, (1, 3, 16, 16), STATS3), "mobile": (TinyMobile, (1, 3, 8, 8), STATS3),
          "digits": (DigitsCNN, (1, 1, 8, 8), graphnorm.InputStats.standard(1))}
MODES = {"analytic": {"mode": "analytic"}, "reparam": {"mode": "reparam"},
         "noise": {"mode": "analytic", "stochastic_batch": 8},
         "reparam-noise": {"mode": "reparam", "stochastic_batch": 8},
         "learned-noise": {"mode": "analytic", "noise": "learned"}}


def _perturbed(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.0 + 0.3 * torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype))
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def _statistics_and_gradients(converted: graphnorm.ConvertedModule) -> tuple[list[torch.Tensor], dict]:
    converted.train()
    outputs = converted.statistics_program(*converted.statistics_inputs())
    generator = torch.Generator().manual_seed(9)
    probes = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]
    named = {name: p for name, p in converted.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outputs, probes, strict=True)), list(named.values()),
                                allow_unused=True)
    return [o.detach() for o in outputs], dict(zip(named, grads, strict=True))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_fast_statistics_equal_the_reference_in_float64(model: str, mode: str, monkeypatch) -> None:
    build, shape, stats = MODELS[model]
    torch.manual_seed(0)
    original = build().double()
    fast = graphnorm.convert(original, stats, input_shape=shape, agreement_samples=0, **MODES[mode])
    with fusion(False):
        reference = graphnorm.convert(original, stats, input_shape=shape, agreement_samples=0, **MODES[mode])
    assert fast.statistics_program is not None
    assert fast.graphnorm_log.statistics.fused > 0 and reference.graphnorm_log.statistics.fused > 0
    got, got_grads = _statistics_and_gradients(_perturbed(fast))
    with monkeypatch.context() as patch:
        plain_formulas(patch)
        want, want_grads = _statistics_and_gradients(_perturbed(reference))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert _relative(g, w) <= 1e-10
    assert got_grads.keys() == want_grads.keys()
    reached = 0
    for name, w in want_grads.items():
        g = got_grads[name]
        assert (g is None) == (w is None), name
        if w is not None and w.abs().max() > 0:
            reached += 1
            assert _relative(g, w) <= 1e-10, name
    assert reached > 0


def test_normprop_norm_gradients_equal_autograd_in_float64(monkeypatch) -> None:
    """NormProp has no statistics program: its layers' norms run with a workspace (graphnorm.normalizers);
    their gradients equal plain autograd's."""
    torch.manual_seed(0)
    converted = graphnorm.convert(TinyMobile().double(), STATS3, input_shape=(1, 3, 8, 8), mode="normprop",
                                  agreement_samples=0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(converted)
    for model in (converted, reference):
        model.train()
    converted(x).square().sum().backward()
    with monkeypatch.context() as patch:
        plain_formulas(patch)
        reference(x).square().sum().backward()
    for (name, got), want in zip(converted.named_parameters(), reference.parameters(), strict=True):
        if want.grad is not None:
            assert _relative(got.grad, want.grad) <= 1e-10, name


def test_the_log_counts_the_program_and_names_rules_without_a_fused_form() -> None:
    torch.manual_seed(0)
    converted = graphnorm.convert(TinyResNet(), STATS3, input_shape=(1, 3, 16, 16), agreement_samples=0)
    summary = converted.graphnorm_log.statistics
    program = converted.statistics_program.train_program
    assert summary.ops == graphnorm.program.op_count(program) < 40
    assert summary.fused == sum(node.op == "call_module" for node in program.graph.nodes)
    assert summary.unfused == {"add": (1, 2)}  # the residual add before the last block: means, variances
    text = str(converted.graphnorm_log)
    assert f"statistics program: {summary.ops} ops" in text and "add (1 node, 2 ops)" in text
    assert converted.graphnorm_log.to_dict()["statistics"]["unfused"] == {"add": {"nodes": 1, "ops": 2}}
    with fusion(False):
        unfused = graphnorm.convert(TinyResNet(), STATS3, input_shape=(1, 3, 16, 16), agreement_samples=0)
    assert unfused.graphnorm_log.statistics.ops > 4 * summary.ops
    assert "relu" in unfused.graphnorm_log.statistics.unfused
