"""Where the accurate mode's remaining error comes from: the per-node diagnoses behind docs/math.md 6.4-6.5.

Every BatchNorm uses the analytic statistics of its input (as in ``propagation_accuracy.py``); networks are
torchvision's at initialization (seed 0, N(0, 1) input) or the trained digits CNN on the 1797 real digits
(per-position input statistics with the 3x3 patch correlation). Three diagnoses:

- ``nodes``: analytic / measured std (median over channels) at every node, in graph order.
- ``adds``: the measured per-channel correlation of the two operands of every residual add, which the rules
  take as independent, and what it does to the variance of the sum.
- ``depthwise``: for a depthwise convolution node, its output channel correlation measured, computed by
  graphnorm's rule from the *measured* input moments (cross-position channel covariance approximated by
  ``S_cd (rho_c + rho_d)/2``), and computed exactly from the measured cross-position covariance.
- ``mehler``: for an activation node, its neighbour template and its channel correlation measured, predicted
  by Mehler's formula from the *measured* pre-activation moments (the Gaussian-pair assumption alone), and
  propagated by graphnorm.

    python benchmarks/correlation_diagnosis.py nodes digits
    python benchmarks/correlation_diagnosis.py nodes digits --no-channel-correlation   # convolutions drop it
    python benchmarks/correlation_diagnosis.py nodes resnet18 mobilenet_v2 efficientnet_b0
    python benchmarks/correlation_diagnosis.py adds resnet18 mobilenet_v2
    python benchmarks/correlation_diagnosis.py mehler efficientnet_b0 --node features_1_0_block_0_2 --channel 31
    python benchmarks/correlation_diagnosis.py mehler mobilenet_v2 --node features_3_conv_1_2
    python benchmarks/correlation_diagnosis.py depthwise mobilenet_v2 --node features_3_conv_1_0
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torchvision
from sklearn.datasets import load_digits

import graphnorm.rules.channel_correlation as channel_correlation
from graphnorm import InputStats
from graphnorm.loading import load_model
from graphnorm.measure import _Recorder, analytic_batchnorm_statistics, measure
from graphnorm.moments import Moments
from graphnorm.propagate import MomentPropagator
from graphnorm.rules.channel_correlation import activation_correlation, depthwise_correlation
from graphnorm.rules.neighbours import RADIUS, activation_template, hermite_coefficients

ROOT = Path(__file__).resolve().parents[1]


def _network(name: str, size: int) -> tuple[torch.nn.Module, InputStats, tuple[int, ...], list[torch.Tensor]]:
    """The model, its input statistics, input shape and measurement batches."""
    if name == "digits":
        images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
        model = load_model(os.fspath(ROOT / "fixtures" / "digits_cnn.pt")).model.eval()
        stats = InputStats.from_data(images, per_position=True, patch_covariance=3)
        return model, stats, (1, 1, 8, 8), [images]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    stats = InputStats.standard(3)
    generator = torch.Generator().manual_seed(1)
    batches = [stats.sample((64, 3, size, size), generator=generator) for _ in range(4)]
    return model, stats, (1, 3, size, size), batches


def _propagated(name: str, size: int):
    model, stats, shape, batches = _network(name, size)
    propagator = MomentPropagator(copy.deepcopy(model), shape, spatial=True, batch_norm="analytic",
                                  accuracy="accurate")
    with torch.no_grad():
        table = propagator.run(stats)
    graph_module = propagator.graph_module
    return propagator, table, graph_module, analytic_batchnorm_statistics(graph_module, table), batches


def _recorded(graph_module, names: set[str], overrides, batches) -> dict[str, torch.Tensor]:
    """The values of ``names`` over all batches, copied when produced (in-place activations overwrite them)."""
    values: dict[str, list[torch.Tensor]] = {}

    class Recorder(_Recorder):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in names:
                values.setdefault(node.name, []).append(value.detach().clone().double())
            return value

    recorder = Recorder(graph_module, names, {}, overrides)
    with torch.no_grad():
        for batch in batches:
            recorder.run(batch)
    return {name: torch.cat(parts) for name, parts in values.items()}


def nodes(name: str, size: int) -> None:
    propagator, table, graph_module, overrides, batches = _propagated(name, size)
    names = [n.name for n in graph_module.graph.nodes if n.name in table and len(table[n.name].shape) >= 1]
    measured = measure(graph_module, batches, names, batchnorm_statistics=overrides)
    for node in names:
        if node in measured:
            ratio = (table[node].std.double() / measured[node].var.sqrt()).median().item()
            print(f"{node:48s} {propagator.info[node].op:18s} analytic/measured std {ratio:.3f}")


def adds(name: str, size: int) -> None:
    propagator, _, graph_module, overrides, batches = _propagated(name, size)
    sums = [n for n in graph_module.graph.nodes if n.name in propagator.info and propagator.info[n.name].op == "add"
            and all(isinstance(a, torch.fx.Node) for a in n.args[:2])]
    values = _recorded(graph_module, {a.name for n in sums for a in n.args[:2]}, overrides, batches)
    for node in sums:
        first, second = (values[a.name] - values[a.name].mean(0) for a in node.args[:2])
        covariance = (first * second).mean(0).flatten(1).mean(1)
        var_first, var_second = (v.square().mean(0).flatten(1).mean(1) for v in (first, second))
        correlation = covariance / (var_first * var_second).sqrt()
        independent = (var_first + var_second) / (var_first + var_second + 2 * covariance)
        print(f"{name} {node.name:8s} operand correlation: median |corr| {correlation.abs().median():.3f}, mean "
              f"{correlation.mean():+.3f}; independent / true variance: median |1 - r| "
              f"{(1 - independent).abs().median():.3f}, median r {independent.median():.3f}")


def _template(samples: torch.Tensor, radius: int = RADIUS, crop: int = 2) -> torch.Tensor:
    """Measured per-channel correlation of positions at offsets within ``radius`` (interior of the maps)."""
    x = samples[..., crop:-crop, crop:-crop]
    x = x - x.mean(0, keepdim=True)
    height, width = x.shape[-2:]
    var = x.square().mean((0, 2, 3))
    out = torch.zeros(x.shape[1], 2 * radius + 1, 2 * radius + 1, dtype=x.dtype)
    for dh in range(-radius, radius + 1):
        for dw in range(-radius, radius + 1):
            a = x[..., max(0, -dh):height - max(0, dh), max(0, -dw):width - max(0, dw)]
            b = x[..., max(0, dh):height - max(0, -dh) or None, max(0, dw):width - max(0, -dw) or None]
            out[:, dh + radius, dw + radius] = (a * b).mean((0, 2, 3)) / var
    return out


def _channel_correlation(samples: torch.Tensor, crop: int = 1) -> torch.Tensor:
    x = samples[..., crop:-crop, crop:-crop]
    return torch.corrcoef(x.movedim(1, -1).reshape(-1, x.shape[1]).T)


def mehler(name: str, size: int, node: str, channel: int | None) -> None:
    _, table, graph_module, overrides, batches = _propagated(name, size)
    target = next(n for n in graph_module.graph.nodes if n.name == node)
    source = target.args[0].name
    values = _recorded(graph_module, {source, node}, overrides, batches)
    pre, post = values[source], values[node]
    function = graph_module.get_submodule(target.target) if target.op == "call_module" else target.target
    interior = pre[..., 2:-2, 2:-2]
    mean, var = interior.mean((0, 2, 3)), interior.var(0).mean((1, 2))
    coefficients = hermite_coefficients(function, mean, var)
    measured_pre = Moments(mean, var, (len(mean),), channel_correlation=_channel_correlation(pre))
    templates = {"measured": _template(post), "Mehler(measured input)": activation_template(coefficients,
                                                                                             _template(pre)),
                 "graphnorm": table[node].neighbours.double()}
    correlations = {"measured": _channel_correlation(post),
                    "Mehler(measured input)": activation_correlation(coefficients, measured_pre),
                    "graphnorm": table[node].channel_correlation.double()}
    off_diagonal = ~torch.eye(len(mean), dtype=torch.bool)
    pre_sums = _template(pre).sum((1, 2))
    print(f"{name} {node} ({function}), pre-activation template sum (measured) median {pre_sums.median():.3f}"
          + (f", channel {channel}: {pre_sums[channel]:.3f}" if channel is not None else ""))
    for label in templates:
        sums = templates[label].sum((1, 2))
        shown = f", channel {channel}: {sums[channel]:.3f}" if channel is not None else ""
        error = (correlations[label] - correlations["measured"])[off_diagonal].abs().mean()
        print(f"  {label:24s} template sum median {sums.median():.3f}{shown}; channel correlation mean abs error "
              f"{error:.4f} (measured mean |corr| {correlations['measured'][off_diagonal].abs().mean():.4f})")


def depthwise(name: str, size: int, node: str) -> None:
    _, _, graph_module, overrides, batches = _propagated(name, size)
    target = next(n for n in graph_module.graph.nodes if n.name == node)
    source = target.args[0].name
    weight = graph_module.get_submodule(target.target).weight.detach().double()  # [C, 1, k, k]
    values = _recorded(graph_module, {source, node}, overrides, batches)
    x = values[source][..., 3:-3, 3:-3]
    x = x - x.mean(0, keepdim=True)
    covariance = torch.einsum("nchw,ndhw->cd", x, x) / (x.shape[0] * x.shape[2] * x.shape[3])
    std = covariance.diagonal().sqrt()
    measured_input = Moments(torch.zeros_like(std), std.square(), (len(std), *x.shape[2:]),
                             third=torch.zeros_like(std), neighbours=_template(values[source], crop=3),
                             channel_correlation=covariance / torch.outer(std, std))
    approximated = depthwise_correlation(measured_input, weight, 1)
    kernel = weight.shape[-1]
    height, width = x.shape[-2:]
    exact = torch.zeros_like(covariance)
    for k0, k1, l0, l1 in torch.cartesian_prod(*(torch.arange(kernel),) * 4).tolist():
        d0, d1 = l0 - k0, l1 - k1
        a = x[..., max(0, -d0):height - max(0, d0), max(0, -d1):width - max(0, d1)]
        b = x[..., max(0, d0):height - max(0, -d0) or None, max(0, d1):width - max(0, -d1) or None]
        cross = torch.einsum("nchw,ndhw->cd", a, b) / (a.shape[0] * a.shape[2] * a.shape[3])
        exact += weight[:, 0, k0, k1].unsqueeze(1) * weight[:, 0, l0, l1].unsqueeze(0) * cross
    exact_std = exact.diagonal().sqrt()
    measured = _channel_correlation(values[node])
    off_diagonal = ~torch.eye(len(std), dtype=torch.bool)
    print(f"{name} {node}: measured mean |corr| {measured[off_diagonal].abs().mean():.4f}")
    for label, correlation in (("graphnorm's rule on measured input", approximated),
                               ("exact from measured C_cd(delta)", exact / torch.outer(exact_std, exact_std))):
        print(f"  {label:36s} mean abs error {(correlation - measured)[off_diagonal].abs().mean():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("diagnosis", choices=["nodes", "adds", "mehler", "depthwise"])
    parser.add_argument("models", nargs="+", help="torchvision model names, or digits")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--node", help="mehler: the activation node; depthwise: the depthwise convolution node")
    parser.add_argument("--channel", type=int, help="mehler: also show this channel")
    parser.add_argument("--no-channel-correlation", action="store_true",
                        help="CORRELATION_BUDGET = 0: no convolution carries the channel correlation")
    args = parser.parse_args()
    if args.no_channel_correlation:
        channel_correlation.CORRELATION_BUDGET = 0
    for name in args.models:
        if args.diagnosis == "nodes":
            nodes(name, args.size)
        elif args.diagnosis == "adds":
            adds(name, args.size)
        elif args.diagnosis == "depthwise":
            depthwise(name, args.size, args.node)
        else:
            mehler(name, args.size, args.node, args.channel)


if __name__ == "__main__":
    main()
