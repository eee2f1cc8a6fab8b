"""Properties of graphnorm.convert, each checked against the original model or an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from conversion_models import DigitsCNN, EveryForm, SharedBatchNorm, conv_chain

import graphnorm
from graphnorm import GraphnormError, InputStats, MomentPropagator
from graphnorm.normalizers import batch_noise

STATS3 = InputStats([0.3, -0.2, 0.1], [1.0, 0.5, 2.0])
DETERMINISTIC = ["analytic", "reparam", "normprop", "fixed"]
BATCH_FREE = ["analytic", "reparam", "normprop"]


def convert(model, mode, shape=(1, 3, 8, 8), stats=STATS3, **kwargs):
    return graphnorm.convert(model, stats, input_shape=shape, mode=mode, **kwargs)


@pytest.mark.parametrize("mode", BATCH_FREE)
def test_batch_independence_in_training(mode: str) -> None:
    model = conv_chain()
    converted = convert(model, mode).train()
    batch = STATS3.sample((64, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = converted(batch)
        alone = converted(batch[:1])
    torch.testing.assert_close(alone, together[:1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        original_together = model.train()(batch)
        original_alone = model(batch[:2])
    assert (original_alone[:1] - original_together[:1]).abs().max() > 1e-2  # BatchNorm itself is not


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_train_equals_eval(mode: str) -> None:
    converted = convert(conv_chain(), mode)
    x = STATS3.sample((5, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    train_out = converted.train()(x)
    eval_out = converted.eval()(x)
    torch.testing.assert_close(train_out, eval_out, rtol=1e-5, atol=1e-6)


def test_reparam_equals_analytic_and_folds_into_the_producer() -> None:
    model = conv_chain()
    analytic, reparam = convert(model, "analytic").eval(), convert(model, "reparam").eval()
    x = STATS3.sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(reparam(x), analytic(x), rtol=1e-4, atol=1e-5)
    assert reparam.graphnorm_log.counts == {"reparam": 3}
    assert parametrize.is_parametrized(reparam.get_submodule("0"), "weight")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reparam.modules())


@pytest.mark.parametrize("mode", ["analytic", "reparam"])
def test_gradients_reach_upstream_weights_through_the_statistics(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1),
                          nn.BatchNorm2d(2)).double()
    converted = graphnorm.convert(model, InputStats([0.5, -0.5], [1.0, 2.0]), input_shape=(1, 2, 5, 5),
                                  mode=mode).train()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    target = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    first = next(p for n, p in converted.named_parameters() if n.startswith("0.") and p.dim() == 4)

    def loss() -> torch.Tensor:
        return ((converted(x) - target) ** 2).sum()

    grad = torch.autograd.grad(loss(), first)[0]
    numeric = torch.zeros_like(first)
    step = 1e-6
    with torch.no_grad():
        for index in [(0, 0, 0, 0), (1, 1, 2, 1), (2, 0, 1, 2), (0, 1, 2, 2)]:
            original = first[index].item()
            first[index] = original + step
            up = loss().item()
            first[index] = original - step
            down = loss().item()
            first[index] = original
            numeric[index] = (up - down) / (2 * step)
            assert grad[index].item() == pytest.approx(numeric[index].item(), rel=1e-5, abs=1e-7), index
    if mode == "analytic":
        # The gradient really goes through the statistics: with them frozen (eval caches them without
        # autograd) the same loss has another gradient. (Reparam computes sigma(W) inside the
        # parametrization, so its gradient never depends on the cache.)
        converted.eval()
        frozen = torch.autograd.grad(loss(), first)[0]
        assert (frozen - grad).abs().max() > 1e-3 * grad.abs().max()


def test_self_consistency_of_normalizer_outputs() -> None:
    model = conv_chain()
    converted = convert(model, "analytic", spatial=True)  # per unit: exact zero padding on 8x8 images
    table = graphnorm.propagate(converted, STATS3, (1, 3, 8, 8))
    norms = [(name, info) for name, info in table.info.items() if info.op == "analytic_norm"]
    assert len(norms) == 3
    generator = torch.Generator().manual_seed(3)
    x = STATS3.sample((512, 3, 8, 8), generator=generator)
    graph_module = converted
    from graphnorm.measure import measure

    converted.eval()
    converted.refresh_statistics()
    measured = measure(graph_module, [x], [name for name, _ in norms])
    for depth, (name, info) in enumerate(norms):
        module = converted.get_submodule(info.module_path)
        beta, gamma = module.bias.detach(), module.weight.detach()
        moments = table[name]
        input_var = module.statistics[1]
        torch.testing.assert_close(moments.mean, beta)
        torch.testing.assert_close(moments.var, gamma**2 * input_var / (input_var + module.eps), rtol=1e-4, atol=1e-6)
        # Measured on data: exact at the first normalizer (its conv sums independent inputs); deeper ones sum
        # correlated neighbours, which the independence assumption ignores (docs/benchmarks.md).
        tolerance = 0.03 if depth == 0 else 0.15
        assert ((measured[name].mean.float() - beta).abs() < tolerance * gamma.abs()).all(), (depth, name)
        ratio = measured[name].var.sqrt().float() / gamma.abs()
        assert ((ratio - 1).abs() < tolerance).all(), (depth, ratio)


def test_fixed_mode_equals_original_with_running_statistics_overwritten_by_hand() -> None:
    model = conv_chain()
    fixed = convert(model, "fixed").eval()
    table = MomentPropagator(model, (1, 3, 8, 8), batch_norm="analytic", spatial=True,  # the fixed-mode defaults
                             accuracy="accurate").run(STATS3)
    by_hand = copy.deepcopy(model).eval()
    with torch.no_grad():
        for index in (1, 4, 7):
            source = str(index - 1)
            by_hand[index].running_mean.copy_(table[f"_{source}"].mean)
            by_hand[index].running_var.copy_(table[f"_{source}"].var)
    x = STATS3.sample((6, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fixed(x), by_hand(x), rtol=1e-5, atol=1e-6)
    fixed.train()
    torch.testing.assert_close(fixed(x), by_hand(x), rtol=1e-5, atol=1e-6)  # eval semantics in training too


def test_shared_batchnorm_and_multi_user_outputs_are_rewritten_per_call_site() -> None:
    torch.manual_seed(0)
    model = SharedBatchNorm()
    stats = STATS3
    fixed = convert(model, "fixed", shape=(1, 3, 6, 6)).eval()
    table = MomentPropagator(model, (1, 3, 6, 6), batch_norm="analytic", spatial=True, accuracy="accurate").run(stats)
    # By hand: each call of the shared BatchNorm normalizes with the statistics of its own input.
    bn = model.bn

    def by_hand(x):
        def norm(y, source, module):
            return nn.functional.batch_norm(y, table[source].mean, table[source].var, module.weight, module.bias,
                                            False, 0.0, module.eps)

        a = torch.relu(norm(model.conv_a(x), "conv_a", bn))
        b = norm(model.conv_b(x) * 3.0, "mul", bn)
        c = model.conv_c(a + b)
        return torch.relu(norm(c, "conv_c", model.bn_c)) + c

    x = stats.sample((4, 3, 6, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), by_hand(x), rtol=1e-5, atol=1e-5)
    assert fixed.graphnorm_log.counts == {"fixed": 3}
    reparam = convert(model, "reparam", shape=(1, 3, 6, 6))
    forms = {r.node: (r.form, r.detail) for r in reparam.graphnorm_log.rewritten}
    assert forms["bn"][0] == "reparam"  # conv_a feeds only the BatchNorm
    assert forms["bn_1"][0] == "analytic" and "no Linear/Conv" in forms["bn_1"][1]  # input is conv_b * 3
    assert forms["bn_c"][0] == "analytic" and "other users" in forms["bn_c"][1]  # c also feeds the skip
    analytic = convert(model, "analytic", shape=(1, 3, 6, 6)).eval()
    torch.testing.assert_close(reparam.eval()(x), analytic(x), rtol=1e-4, atol=1e-5)
    # The shared BatchNorm's parameters stay shared between its two normalizers.
    assert analytic.get_submodule("bn").weight is analytic.get_submodule("bn_site1").weight


def test_every_batchnorm_form_is_found_and_the_channel_axis_checked() -> None:
    torch.manual_seed(0)
    model = EveryForm().eval()
    stats = InputStats([0.0, 1.0], [1.0, 0.5])
    for mode in DETERMINISTIC:
        converted = graphnorm.convert(model, stats, input_shape=(2, 2, 8, 8), mode=mode)
        log = converted.graphnorm_log
        assert len(log.rewritten) == 8 and not log.skipped, str(log)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
        functional = {torch.batch_norm, nn.functional.batch_norm}
        assert not any(n.op == "call_function" and n.target in functional for n in converted.graph.nodes)
        assert "f_mean" not in str(converted.code)  # the functional BatchNorms' buffers are gone with them
    reparam = graphnorm.convert(model, stats, input_shape=(2, 2, 8, 8), mode="reparam").graphnorm_log
    forms = {r.module_path: (r.form, r.detail) for r in reparam.rewritten}
    assert forms["bn_seq"][0] == "analytic" and "normalizes dim 1" in forms["bn_seq"][1]
    assert forms["bn1d"][0] == "reparam" and forms["sync"][0] == "reparam"


def test_batchnorm1d_on_sequences_normalizes_channels_not_length() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(3))
    stats = InputStats([0.5, -1.0, 2.0], [1.0, 2.0, 0.5])
    fixed = graphnorm.convert(model, stats, input_shape=(1, 3, 5), mode="fixed").eval()
    reparam = graphnorm.convert(model, stats, input_shape=(1, 3, 5), mode="reparam").eval()
    x = torch.randn(4, 3, 5) * stats.std.float().reshape(1, 3, 1) + stats.mean.float().reshape(1, 3, 1)
    torch.testing.assert_close(reparam(x), fixed(x), rtol=1e-5, atol=1e-5)
    running = fixed.get_submodule("1").running_mean
    assert running.shape == (3,)


def test_the_input_model_is_never_modified() -> None:
    model = conv_chain().train()
    before = copy.deepcopy(model.state_dict())
    for mode in DETERMINISTIC:
        convert(model, mode)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model[1].weight is not convert(model, "analytic").get_submodule("1").weight


def test_original_parameters_keep_their_values() -> None:
    model = conv_chain()
    converted = convert(model, "analytic")
    for name in ("1.weight", "1.bias", "0.weight", "0.bias"):
        torch.testing.assert_close(converted.get_parameter(name), model.get_parameter(name))


def test_batch_noise_matches_batchnorm_of_a_virtual_batch() -> None:
    torch.manual_seed(0)
    scale, shift = batch_noise(200_000, 1, 32, torch.zeros(()))
    assert scale.std().item() == pytest.approx(0.138, abs=0.004)
    assert shift.std().item() == pytest.approx(0.185, abs=0.004)
    # Independent reference: BatchNorm statistics of real batches of 32 Gaussian values.
    batches = torch.randn(100_000, 32)
    mean, var = batches.mean(1), batches.var(1, unbiased=False)
    assert scale.std().item() == pytest.approx(var.rsqrt().std().item(), rel=0.05)
    assert shift.std().item() == pytest.approx((-mean * var.rsqrt()).std().item(), rel=0.05)


def test_stochastic_normalization_is_random_in_training_only() -> None:
    converted = convert(conv_chain(), "analytic", stochastic_batch=16)
    x = STATS3.sample((3, 3, 8, 8), generator=torch.Generator().manual_seed(6))
    converted.train()
    assert not torch.allclose(converted(x), converted(x))
    converted.eval()
    torch.testing.assert_close(converted(x), converted(x))
    deterministic = convert(conv_chain(), "analytic").eval()
    torch.testing.assert_close(converted(x), deterministic(x), rtol=1e-5, atol=1e-6)


def test_eval_statistics_are_cached_until_parameters_change() -> None:
    converted = convert(conv_chain(), "analytic").eval()
    program = converted.statistics_program
    x = STATS3.sample((2, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    converted(x)
    stats_before = program._cached
    converted(x)
    assert program._cached is stats_before  # cached
    with torch.no_grad():
        converted.get_parameter("3.weight").mul_(2.0)
    converted(x)
    after = program._cached
    assert after is not stats_before
    # the second normalizer's input variance scales with the square of conv 3's weight
    torch.testing.assert_close(after[3], stats_before[3] * 4.0, rtol=1e-4, atol=1e-6)
    converted.refresh_statistics()
    torch.testing.assert_close(converted.get_submodule("4").statistics[1], after[3])


def test_conversion_log_reports_what_happened() -> None:
    log = convert(conv_chain(), "normprop").graphnorm_log
    assert log.counts == {"normprop": 3}
    assert "3 BatchNorm call site(s) rewritten (3 normprop)" in str(log)
    as_dict = log.to_dict()
    assert as_dict["mode"] == "normprop" and len(as_dict["rewritten"]) == 3
    assert "ReLU output re-centred" in as_dict["rewritten"][0]["detail"]


def test_normprop_keeps_activations_normalized_with_c_equal_1() -> None:
    torch.manual_seed(0)
    model = conv_chain(depth=6, width=16)
    for bn in model:
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
    stats = InputStats([0.5, -1.0, 2.0], [1.0, 2.0, 0.5])
    variances = {}
    for c in (1.0, 1.21):
        converted = graphnorm.convert(model, stats, input_shape=(1, 3, 16, 16), mode="normprop", normprop_c=c)
        x = stats.sample((256, 3, 16, 16), generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            variances[c] = converted.eval()(x).var().item()
            predicted = graphnorm.propagate(converted, stats, (1, 3, 16, 16), spatial=True)["output"]
        predicted_var = (predicted.var + predicted.mean.square()).mean() - predicted.mean.mean().square()
        assert predicted_var.item() == pytest.approx(variances[c], rel=0.2)
    assert 0.7 < variances[1.0] < 1.3  # c = 1 keeps the forward pass normalized
    assert variances[1.21] < 0.8  # 1.21 shrinks it with depth (MATH.md section 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "batchnorm"}, "mode must be one of"),
        ({"mode": "normprop", "stochastic_batch": 8}, "applies to the analytic and reparam"),
        ({"mode": "analytic", "stochastic_batch": 2}, ">= 4"),
        ({"mode": "normprop", "normprop_c": 0.0}, "positive"),
    ],
)
def test_bad_arguments(kwargs, message) -> None:
    with pytest.raises(GraphnormError, match=message):
        graphnorm.convert(conv_chain(), STATS3, input_shape=(1, 3, 8, 8), **kwargs)


def test_training_at_batch_size_one_on_digits() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    stats = InputStats.from_data(images[train])
    torch.manual_seed(0)
    model = graphnorm.convert(DigitsCNN(), stats, input_shape=(1, 1, 8, 8), mode="analytic").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    for epoch in range(2):
        for index in train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]:
            loss = nn.functional.cross_entropy(model(images[index : index + 1]), labels[index : index + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    assert accuracy >= 0.90, accuracy


def test_an_original_checkpoint_loads_into_the_analytic_model() -> None:
    model = conv_chain()
    converted = convert(conv_chain(seed=1), "analytic")
    result = converted.load_state_dict(model.state_dict(), strict=False)
    # Only the calibration buffers the conversion added are missing; they keep the values of the conversion.
    assert sorted(result.missing_keys) == sorted(f"{site}.calibration.{name}" for site in (1, 4, 7)
                                                 for name in ("scale", "shift"))
    assert all(key.endswith(("running_mean", "running_var", "num_batches_tracked")) for key in result.unexpected_keys)
    torch.testing.assert_close(converted.get_parameter("4.weight"), model.get_parameter("4.weight"))
