"""The gradients a converted model trains with, against float64 along a training trajectory.

The fast statistics pass (fused forms with closed-form backward, kernel moments with workspaces, custom ops under
torch.compile) in float32, against the same conversion recorded with fusion off (every rule's own code,
differentiated by autograd) in float64, at the same parameters: five SGD steps with momentum, batch sizes
changing between steps, some steps through torch.compile, on torchvision ResNet-18 and MobileNetV3-Small
(depthwise convolutions, squeeze-excitation, Hardswish), in every trainable mode. A ReLU network has kinks, and
a step can sit within float32 rounding of one, where equally right implementations land on either side; so the
relative gradient error is judged by its median over the steps, with a loose bound on every step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from references import plain_formulas

import graphnorm
from graphnorm.rules.fusion import fusion

STATS = graphnorm.InputStats.standard(3)
SIZE = 32
STEPS = [(2, False), (1, True), (3, False), (1, True), (2, False)]  # (batch, compiled) per step
MODELS = {"resnet18": torchvision.models.resnet18, "mobilenet_v3_small": torchvision.models.mobilenet_v3_small}


def _gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, run=None) -> dict[str, torch.Tensor]:
    """The loss's gradients of ``model``'s parameters, computed through ``run`` (a compiled ``model``)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy((model if run is None else run)(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """``||g32 - g64|| / ||g64||`` over all parameters together. (Per parameter it is meaningless for those whose
    true gradient vanishes: the bias of a BatchNorm whose output is normalized again gets 1e-19 in float64 and
    float32 rounding, 1e-10, in float32.)"""
    assert got.keys() == want.keys()
    difference = sum(float((got[k].double() - want[k]).square().sum()) for k in want)
    return (difference / sum(float(want[k].square().sum()) for k in want)) ** 0.5


@pytest.mark.parametrize("mode", ["analytic", "reparam", "normprop"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_follow_float64_along_a_trajectory(name: str, mode: str, monkeypatch) -> None:
    torch.manual_seed(0)
    model = MODELS[name](weights=None, num_classes=10)
    for module in model.modules():  # dropout's masks would differ between the two models
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    shape = (1, 3, SIZE, SIZE)
    fast = graphnorm.convert(model, STATS, input_shape=shape, mode=mode, agreement_samples=0).train()
    with fusion(False):
        reference = graphnorm.convert(copy.deepcopy(model).double(), STATS, input_shape=shape, mode=mode,
                                      agreement_samples=0).train()
    compiled = torch.compile(fast)
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    errors = []
    for batch, through_compile in STEPS:
        x = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        with torch.no_grad():  # the reference at the fast model's current parameters
            for want, got in zip(reference.parameters(), fast.parameters(), strict=True):
                want.copy_(got)
        got = _gradients(fast, x, y, compiled if through_compile else None)
        with monkeypatch.context() as patch:
            plain_formulas(patch)
            want = _gradients(reference, x.double(), y)
        errors.append(_relative_error(got, want))
        optimizer.step()
    errors.sort()  # measured here: 3e-8 to 9e-7 at every step, float32's rounding
    assert errors[len(errors) // 2] < 1e-5, errors
    assert errors[-1] < 1e-2, errors
