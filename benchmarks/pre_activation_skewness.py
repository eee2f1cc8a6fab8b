"""Why depthwise networks are the hard case: the pre-activations after a depthwise convolution are skewed.

MobileNetV2 at initialization (seed 0), 64x64 N(0, 1) input, BatchNorms recalibrated to the analytic
statistics (per unit). At the first depthwise block, the ReLU6 rule's std is off by about 8% per channel
although its input's mean and std are right to 1-2%: the input is a sum of only nine skewed ReLU6 outputs.
This script measures, on interior positions (away from the padded border), per channel:

- the skewness of the ReLU6 input, measured, and as the third cumulant of an independent sum predicts it,
  ``kappa3(sum_i w_i r_i) = sum_i w_i^3 kappa3(r)``;
- the relative error of the ReLU6 output std computed from the input's measured mean and std under a
  Gaussian (what graphnorm does now), and under the Gram-Charlier (Edgeworth) density
  ``phi(z) (1 + gamma/6 He3(z))`` with the measured and with the predicted skewness ``gamma``.

    python benchmarks/pre_activation_skewness.py      # about a minute
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from common import announce, markdown_table, write_result

import graphnorm
from graphnorm.recalibrate import recalibrate_batchnorm

NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(80)


def interior_values(t: torch.Tensor, border: int = 2) -> torch.Tensor:
    """``[C, n]``: every sample's values at positions at least ``border`` away from the edge, per channel."""
    inner = t[:, :, border:-border, border:-border]
    return inner.transpose(0, 1).reshape(t.shape[1], -1).double()


def skewness(values: torch.Tensor) -> torch.Tensor:
    centred = values - values.mean(1, keepdim=True)
    return centred.pow(3).mean(1) / centred.pow(2).mean(1).pow(1.5)


def relu6_std(mean: torch.Tensor, std: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """Std of ``clamp(X, 0, 6)`` for X with the given mean, std and skewness (Gram-Charlier A density)."""
    nodes, weights = torch.tensor(NODES), torch.tensor(WEIGHTS) / np.sqrt(2 * np.pi)
    density = weights * (1 + skew[:, None] / 6 * (nodes**3 - 3 * nodes))
    values = torch.clamp(mean[:, None] + std[:, None] * nodes, 0, 6)
    first, second = (density * values).sum(1), (density * values * values).sum(1)
    return (second - first.square()).clamp_min(0).sqrt()


def main() -> None:
    torch.manual_seed(0)
    stats = graphnorm.InputStats.standard(3)
    model = recalibrate_batchnorm(torchvision.models.mobilenet_v2(weights=None).eval(), stats, (1, 3, 64, 64),
                                  spatial=True)
    captured: dict[str, torch.Tensor] = {}
    block = model.features[1].conv[0]  # depthwise conv, BatchNorm, ReLU6
    model.features[0][2].register_forward_hook(lambda m, a, out: captured.update(stem=out.detach().clone()))
    block[1].register_forward_hook(lambda m, a, out: captured.update(pre=out.detach().clone()))
    with torch.no_grad():
        model(stats.sample((256, 3, 64, 64), generator=torch.Generator().manual_seed(1)))
    stem, pre = interior_values(captured["stem"]), interior_values(captured["pre"])
    measured_std = pre.clamp(0, 6).std(1)
    mean, std, skew = pre.mean(1), pre.std(1), skewness(pre)
    weight = block[0].weight.detach().double().flatten(1)  # [C, 9]: one kernel per channel
    stem_third = (stem - stem.mean(1, keepdim=True)).pow(3).mean(1)
    predicted = weight.pow(3).sum(1) * stem_third / (weight.pow(2).sum(1) * stem.var(1)).pow(1.5)

    def error(estimate: torch.Tensor) -> tuple[float, float]:
        relative = ((estimate - measured_std) / measured_std).abs()
        return relative.median().item(), relative.max().item()

    rows = {"gaussian (graphnorm today)": error(relu6_std(mean, std, torch.zeros_like(skew))),
            "Gram-Charlier, measured skewness": error(relu6_std(mean, std, skew)),
            "Gram-Charlier, propagated skewness": error(relu6_std(mean, std, predicted))}
    result = {"channels": int(pre.shape[0]), "samples": 256,
              "skew_measured": skew.tolist(), "skew_predicted": predicted.tolist(),
              "skew_prediction_error_median": (skew - predicted).abs().median().item(),
              "relu6_std_error": {name: {"median": m, "worst": w} for name, (m, w) in rows.items()}}
    path = write_result("pre_activation_skewness", result)
    print(f"skewness of the ReLU6 input: measured median |skew| {skew.abs().median().item():.2f}, "
          f"|measured - predicted| median {result['skew_prediction_error_median']:.3f}")
    print(markdown_table(["ReLU6 std from", "median error", "worst"],
                         [[name, f"{m:.3f}", f"{w:.3f}"] for name, (m, w) in rows.items()]))
    announce(path)


if __name__ == "__main__":
    main()
