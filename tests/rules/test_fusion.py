"""Every fused form (graphnorm.rules.fusion) against its reference: the rule's own code differentiated by autograd,
in float64. Values and gradients to 1e-10 relative, through both ways a form runs: the custom op the rules call
(recorded into programs) and the direct call a recorded program makes; then every rule family with fusion on
against the same rule with fusion off, forward and gradients. The reference rules themselves are checked
against Monte Carlo and dense integration in test_montecarlo.py and test_quadrature.py."""

from __future__ import annotations

import math

import pytest
import torch

import graphnorm
from graphnorm import Moments
from graphnorm.rules.activations import Clamped, PiecewiseMoments, Rectified, SmoothMoments
from graphnorm.rules.affine import Normalized
from graphnorm.rules.fusion import FusedForm, fused, fused_call, fusion
from graphnorm.rules.pooling import MaxOfMonotone
from graphnorm.rules.structural import PRODUCT

RELU6 = ((0.0, 6.0), ((0.0,), (0.0, 1.0), (6.0,)))
HARDSWISH = ((-3.0, 3.0), ((0.0,), (0.0, 0.5, 1 / 6), (0.0, 1.0)))
FORMS: dict[str, tuple[FusedForm, int]] = {  # form, number of affine inputs after (mean, var)
    "relu": (Rectified(), 0),
    "relu6": (PiecewiseMoments(*RELU6), 0),
    "relu6_clamped": (Clamped(0.0, 6.0), 0),
    "hardtanh_clamped": (Clamped(-1.0, 1.0), 0),
    "clamp_min_clamped": (Clamped(-1.0, None), 0),
    "clamp_max_clamped": (Clamped(None, 0.5), 0),
    "hardswish": (PiecewiseMoments(*HARDSWISH), 0),
    "hardsigmoid": (PiecewiseMoments((-3.0, 3.0), ((0.0,), (0.5, 1 / 6), (1.0,))), 0),
    "leaky_relu": (PiecewiseMoments((0.0,), ((0.0, 0.1), (0.0, 1.0))), 0),
    "clamp_min": (PiecewiseMoments((-1.0,), ((-1.0,), (0.0, 1.0))), 0),
    "sigmoid": (SmoothMoments("sigmoid"), 0),
    "tanh": (SmoothMoments("tanh"), 0),
    "gelu": (SmoothMoments("gelu", (("approximate", "none"),)), 0),
    "gelu_tanh": (SmoothMoments("gelu", (("approximate", "tanh"),)), 0),
    "silu": (SmoothMoments("silu"), 0),
    "elu": (SmoothMoments("elu", (("alpha", 0.7),)), 0),
    "softplus": (SmoothMoments("softplus", (("beta", 2.0), ("threshold", 20.0))), 0),
    "mish": (SmoothMoments("mish"), 0),
    "normalized": (Normalized(1e-5, True, True), 2),
    "normalized_plain": (Normalized(1e-3, False, False), 0),
    "normalized_weight_only": (Normalized(1e-5, True, False), 1),
    "normalized_noise": (Normalized(1e-5, True, True, 8 / 5, 0.2), 2),
    "max_relu_3x3": (MaxOfMonotone(9, (0.0,), ((0.0,), (0.0, 1.0))), 0),
    "max_relu6_2x2": (MaxOfMonotone(4, *RELU6), 0),
    "product": (PRODUCT, 2),  # a squeeze-excitation gate: (mean, var) of x and of the gate
}


EXTREMES = {  # (means, stds) appended to the ordinary range
    "tails": ([30.0, -30.0, 50.0, -50.0, 200.0, -8.0], [1.0, 1.0, 0.5, 0.5, 2.0, 0.08]),
    "tiny variances": ([1e-3, 0.0, -2e-3, 0.3], [1e-4, 1e-3, 1e-4, 1e-4]),
}


def _inputs(affine: int, seed: int = 0, extreme: str | None = None, size: int = 64) -> list[torch.Tensor]:
    """Means and variances over the range networks produce (|mean|/std up to ~6, std from 0.05 to 5), with
    ``extreme`` entries appended (:data:`EXTREMES`); gamma and beta of either sign."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(size, generator=generator, dtype=torch.float64) * 2
    std = torch.rand(size, generator=generator, dtype=torch.float64) * 4.95 + 0.05
    if extreme is not None:
        means, stds = EXTREMES[extreme]
        mean = torch.cat([mean, torch.tensor(means, dtype=torch.float64)])
        std = torch.cat([std, torch.tensor(stds, dtype=torch.float64)])
    tensors = [mean, std.square()]
    for _ in range(affine):
        tensors.append(torch.randn(mean.shape[0], generator=generator, dtype=torch.float64))
    return [t.requires_grad_() for t in tensors]


def _assert_close(got: torch.Tensor | None, want: torch.Tensor | None, rtol: float = 1e-10) -> None:
    """Equal to ``rtol`` relative to the reference's scale (its largest entry), entry by entry."""
    if want is None or got is None:
        assert got is None or not got.abs().any(), "a gradient where the reference has none"
        assert want is None or not want.abs().any(), "no gradient where the reference has one"
        return
    scale = want.abs().max().clamp_min(1e-300)
    error = ((got - want).abs() / scale).max().item()
    assert error <= rtol, f"relative error {error:.3g}"


def _check(form: FusedForm, inputs: list[torch.Tensor], run, probes: tuple[bool, bool], rtol: float = 1e-10
           ) -> None:
    reference = form.reference(*inputs)
    ours = run(form, inputs)
    for got, want in zip(ours, reference, strict=True):
        _assert_close(got.detach(), want.detach(), rtol)
    generator = torch.Generator().manual_seed(5)
    weights = [torch.randn(t.shape, generator=generator, dtype=t.dtype) if used else None
               for t, used in zip(reference, probes, strict=True)]

    def loss(outputs):
        return sum((o * w).sum() for o, w in zip(outputs, weights, strict=True) if w is not None)

    want = torch.autograd.grad(loss(reference), inputs, allow_unused=True)
    got = torch.autograd.grad(loss(ours), inputs, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w, rtol)


RUNS = {"custom op": lambda form, inputs: fused(form, *inputs),
        "program call": lambda form, inputs: fused_call(form, inputs)}


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("probes", [(True, True), (True, False), (False, True)], ids=["both", "mean", "var"])
@pytest.mark.parametrize("name", sorted(FORMS))
def test_fused_form_equals_its_reference_values_and_gradients(name: str, probes, run: str) -> None:
    form, affine = FORMS[name]
    _check(form, _inputs(affine), RUNS[run], probes)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_fused_form_far_in_the_tails(name: str) -> None:
    """``|mean|/std`` from 30 to 100: where the reference clamps, the closed form agrees with what autograd of the
    clamped reference gives."""
    form, affine = FORMS[name]
    _check(form, _inputs(affine, seed=1, extreme="tails"), RUNS["program call"], (True, True))


SMOOTH = sorted(name for name, (form, _) in FORMS.items() if isinstance(form, SmoothMoments))


@pytest.mark.parametrize("name", sorted(set(FORMS) - set(SMOOTH)))
def test_fused_form_at_tiny_variances(name: str) -> None:
    """Variances of 1e-8 to 1e-6: closed forms (piecewise polynomials, normalization) agree to rounding."""
    form, affine = FORMS[name]
    _check(form, _inputs(affine, seed=1, extreme="tiny variances"), RUNS["program call"], (True, True))


@pytest.mark.parametrize("name", SMOOTH)
def test_smooth_form_at_tiny_variances_against_the_taylor_series(name: str) -> None:
    """At a variance of 1e-8 the variance gradient of a smooth activation, ``E[f'']/2``, is what the quadrature
    keeps of terms ``1/std`` times larger: in float64 the reference's autograd and the closed form both keep
    about six digits of it. Both are checked against the independent small-variance expansion
    ``E[f] = f + v f''/2 + v^2 f''''/8``, ``Var f = v f'^2 + v^2 (f' f''' + f''^2/2)`` (derivatives of f by
    autograd): the closed form within 1e-5 of the gradients' scale (the reference's own error there is of the
    same order, 4e-7 to 3e-6 for the sigmoid and tanh: sometimes above the closed form's, sometimes below)."""
    form, _ = FORMS[name]
    points = [(0.3, 1e-4), (-0.7, 1e-4), (1e-3, 1e-4), (2.0, 1e-3)]  # all > 5 std from the asymptote's kink
    mean = torch.tensor([m for m, _ in points], dtype=torch.float64, requires_grad=True)
    var = torch.tensor([s * s for _, s in points], dtype=torch.float64, requires_grad=True)
    x = mean.detach().clone().requires_grad_()
    derivatives = [form.activation.function(x)]
    for _ in range(4):
        derivatives.append(torch.autograd.grad(derivatives[-1].sum(), x, create_graph=True)[0])
    f1, f2, f3, f4 = (d.detach() for d in derivatives[1:])
    v = var.detach()
    truth = [f1 + v / 2 * f3, f2 / 2 + v * f4 / 4, 2 * v * f1 * f2, f1**2 + 2 * v * (f1 * f3 + f2**2 / 2)]

    def gradients(outputs):
        grad_mean = torch.autograd.grad(outputs[0].sum(), (mean, var), retain_graph=True)
        grad_var = torch.autograd.grad(outputs[1].sum(), (mean, var), retain_graph=True)
        return [*grad_mean, *grad_var]

    scale = max(t.abs().max().item() for t in truth)
    for got, expected in zip(gradients(fused_call(form, [mean, var])), truth, strict=True):
        assert (got - expected).abs().max().item() <= 1e-5 * scale


def test_forms_are_values() -> None:
    """Equal forms are one form (the custom op's integer for them is shared), and they pickle."""
    import pickle

    for form, _ in FORMS.values():
        assert pickle.loads(pickle.dumps(form)) == form
        assert hash(pickle.loads(pickle.dumps(form))) == hash(form)
    assert SmoothMoments("gelu", (("approximate", "tanh"),)) != SmoothMoments("gelu", (("approximate", "none"),))


# -- every rule family with fusion on against the same rule with fusion off ---------------------------------------
RULE_CALLS = {
    "relu": ("relu", {}),
    "relu6": ("relu6", {}),
    "hardtanh": ("hardtanh", {"min_val": -2.0, "max_val": 1.5}),
    "clamp": ("clamp", {"min_val": -0.5}),
    "hardsigmoid": ("hardsigmoid", {}),
    "hardswish": ("hardswish", {}),
    "leaky_relu": ("leaky_relu", {"negative_slope": 0.2}),
    "sigmoid": ("sigmoid", {}),
    "tanh": ("tanh", {}),
    "gelu": ("gelu", {"approximate": "tanh"}),
    "silu": ("silu", {}),
    "elu": ("elu", {"alpha": 1.3}),
    "softplus": ("softplus", {"beta": 0.5}),
    "mish": ("mish", {}),
}


def _moments(seed: int, shape=(64,)) -> tuple[Moments, list[torch.Tensor]]:
    mean, var = _inputs(0, seed, size=math.prod(shape))[:2]
    if len(shape) > 1:  # per-unit maps
        mean = mean.detach().reshape(shape).requires_grad_()
        var = var.detach().reshape(shape).requires_grad_()
    return Moments(mean, var, tuple(shape)), [mean, var]


def _compare_rule(call, inputs: list[torch.Tensor]) -> None:
    with fusion(False):
        want = call()
    got = call()
    for g, w in zip(got, want, strict=True):
        _assert_close(g.detach(), w.detach())
    weights = [torch.linspace(-1, 2, w.numel(), dtype=w.dtype).reshape(w.shape) for w in want]
    grads_want = torch.autograd.grad(sum((w * p).sum() for w, p in zip(want, weights, strict=True)), inputs,
                                     allow_unused=True)
    grads_got = torch.autograd.grad(sum((g * p).sum() for g, p in zip(got, weights, strict=True)), inputs,
                                    allow_unused=True)
    for g, w in zip(grads_got, grads_want, strict=True):
        _assert_close(g, w)


@pytest.mark.parametrize("shape", [(64,), (4, 4, 4)], ids=["per-channel", "per-unit"])
@pytest.mark.parametrize("name", sorted(RULE_CALLS))
def test_activation_rule_fused_equals_unfused(name: str, shape) -> None:
    key, params = RULE_CALLS[name]
    x, inputs = _moments(2, shape)

    def call():
        out = graphnorm.RULES[key](x, out_shape=shape, **params)
        return out.loc, out.spread

    _compare_rule(call, inputs)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_batch_form_fused_equals_unfused(affine: bool) -> None:
    x, inputs = _moments(3)
    generator = torch.Generator().manual_seed(4)
    weight = (torch.rand(64, generator=generator, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(64, generator=generator, dtype=torch.float64).requires_grad_() if affine else None

    def call():
        out = graphnorm.RULES["batch_norm"](x, running_mean=None, running_var=None, weight=weight, bias=bias,
                                            training=True, eps=1e-5, out_shape=(64,))
        return out.loc, out.spread

    _compare_rule(call, inputs + ([weight, bias] if affine else []))


@pytest.mark.parametrize("shape", [(6, 5, 5), (6, 8)], ids=["2d", "1d"])
@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_max_pool_after_a_monotone_activation_fused_equals_unfused(activation: str, shape) -> None:
    pre, inputs = _moments(5, (6,))
    pre = Moments(pre.loc, pre.spread, shape)
    kernel = (3, 3) if len(shape) == 3 else 3

    def call():
        x = graphnorm.RULES[activation](pre, out_shape=shape)
        out = graphnorm.RULES["max_pool"](x, kernel_size=kernel, stride=2, out_shape=(6, 2, 2) if len(shape) == 3
                                          else (6, 3))
        return out.loc, out.spread

    _compare_rule(call, inputs)


def test_the_accurate_mode_never_fuses() -> None:
    """Third cumulants and correlations are carried by the reference code only: with them, no fused op runs."""
    x, _ = _moments(6)
    x = Moments(x.loc, x.spread, x.shape, third=torch.zeros_like(x.loc))
    graph = torch.fx.experimental.proxy_tensor.make_fx(
        lambda m, v, t: graphnorm.RULES["relu"](Moments(m, v, (64,), third=t), out_shape=(64,)).loc)(
        x.loc.detach(), x.spread.detach(), x.third)
    assert not any(node.target is torch.ops.graphnorm.fused.default for node in graph.graph.nodes)
