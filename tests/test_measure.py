"""measure() and recalibrate_batchnorm() against independent computations."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import graphnorm
from graphnorm import InputStats, MomentPropagator
from graphnorm.measure import measure
from graphnorm.recalibrate import recalibrate_batchnorm


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                         nn.BatchNorm2d(5)).eval()


def test_measure_matches_forward_hooks() -> None:
    model = small_net()
    gm = graphnorm.trace(model)
    batches = [torch.randn(7, 3, 6, 6) for _ in range(3)]
    recorded: list[torch.Tensor] = []
    handle = model[2].register_forward_hook(lambda module, args, out: recorded.append(out.detach().clone()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    accumulators = measure(gm, batches, ["_2"])
    everything = torch.cat(recorded).double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(accumulators["_2"].mean, everything.mean(1))
    torch.testing.assert_close(accumulators["_2"].var, everything.var(1, unbiased=False))
    assert not model[2]._forward_hooks  # measuring leaves no hooks behind


def test_recalibration_writes_propagated_statistics_into_a_copy() -> None:
    model = small_net()
    original = copy.deepcopy(model.state_dict())
    stats = InputStats([0.5, 0.0, -0.5], [1.0, 2.0, 0.5])
    calibrated = recalibrate_batchnorm(model, stats, (1, 3, 6, 6))  # 6x6: per unit by default
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    table = MomentPropagator(model, (1, 3, 6, 6), batch_norm="analytic", spatial=True, accuracy="accurate").run(stats)
    torch.testing.assert_close(calibrated[1].running_mean, table["_0"].mean.detach())
    torch.testing.assert_close(calibrated[1].running_var, table["_0"].var.detach())
    torch.testing.assert_close(calibrated[4].running_var, table["_3"].var.detach())
    # With analytic statistics in place, the eval-mode copy propagates to (beta, gamma^2 v/(v+eps)).
    after = MomentPropagator(calibrated, (1, 3, 6, 6), spatial=True, accuracy="accurate").run(stats)
    torch.testing.assert_close(after["_4"].mean, calibrated[4].bias.detach(), atol=1e-5, rtol=0)
