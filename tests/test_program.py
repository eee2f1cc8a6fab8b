"""The recorded statistics program (graphnorm.program) against the interpreted moment pass it was recorded from.

The reference is ``StatisticsState.interpret``: the fx.Interpreter over Moments, whose rules are checked against
Monte Carlo in tests/rules. The program must compute the same statistics, with the same gradients, at weights
other than those it was recorded at, and hold no interpreter, no random op and no device constant.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conversion_models import DigitsCNN, SharedBatchNorm, conv_chain

import graphnorm
from graphnorm.program import op_count

STATS1 = graphnorm.InputStats.standard(1)
STATS3 = graphnorm.InputStats(torch.tensor([0.2, -0.1, 0.4]), torch.tensor([1.0, 0.5, 2.0]))


def _interpreted(converted: graphnorm.ConvertedModule) -> list[torch.Tensor]:
    state = converted._statistics_state()
    dtype = converted.statistics_program.input_mean.dtype
    return state.interpret(converted, *state.input_tensors(dtype))


def _programmed(converted: graphnorm.ConvertedModule) -> list[torch.Tensor]:
    return converted.statistics_program(*converted.statistics_inputs())


def _perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.0 + 0.3 * torch.rand(parameter.shape, generator=generator))


CASES = [
    ("chain-analytic", lambda: conv_chain(), (1, 3, 8, 8), STATS3, {"mode": "analytic"}),
    ("chain-reparam-noise", lambda: conv_chain(), (1, 3, 8, 8), STATS3, {"mode": "reparam", "stochastic_batch": 8}),
    ("digits-spatial", DigitsCNN, (1, 1, 8, 8), STATS1, {"mode": "analytic", "spatial": True}),
    ("shared", SharedBatchNorm, (1, 3, 6, 6), STATS3, {"mode": "reparam"}),
    ("sampled-softsign", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Softsign(),
                                               nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
     (1, 3, 6, 6), STATS3, {"mode": "analytic"}),
]


@pytest.mark.parametrize("name, build, shape, stats, kwargs", CASES, ids=[case[0] for case in CASES])
@pytest.mark.parametrize("training", [True, False])
def test_program_equals_the_interpreted_pass_at_new_weights(name, build, shape, stats, kwargs, training) -> None:
    torch.manual_seed(0)
    converted = graphnorm.convert(build(), stats, input_shape=shape, agreement_samples=0, **kwargs)
    _perturb(converted, seed=1)  # not the weights the program was recorded at
    converted.train(training)
    with torch.enable_grad():
        programmed, interpreted = _programmed(converted), _interpreted(converted)
    assert len(programmed) == len(interpreted) > 0
    for got, want in zip(programmed, interpreted, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if training:  # the same gradients reach the weights
        weights = [p for p in converted.parameters() if p.requires_grad]
        got = torch.autograd.grad(sum((t * (k + 1)).sum() for k, t in enumerate(programmed)), weights,
                                  allow_unused=True)
        want = torch.autograd.grad(sum((t * (k + 1)).sum() for k, t in enumerate(interpreted)), weights,
                                   allow_unused=True)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_the_graph_calls_the_program_first_and_no_interpreter() -> None:
    converted = graphnorm.convert(DigitsCNN(), STATS1, input_shape=(1, 1, 8, 8), agreement_samples=0)
    calls = [node for node in converted.graph.nodes if node.op == "call_module"]
    assert calls[0].target == "graphnorm_statistics"
    program = converted.statistics_program
    for recorded in (program.train_program, program.eval_program):
        assert not any(isinstance(node.target, torch._ops.OpOverload)
                       and torch.Tag.nondeterministic_seeded in node.target.tags for node in recorded.graph.nodes)
        assert "device(type=" not in recorded.code  # devices follow the input statistics' buffer
        assert 0 < op_count(recorded) < 200
    assert "Interpreter" not in converted.code and "graphnorm_statistics" in converted.code


def test_models_without_analytic_sites_have_no_program() -> None:
    for mode in ("fixed", "normprop"):
        converted = graphnorm.convert(DigitsCNN(), STATS1, input_shape=(1, 1, 8, 8), mode=mode, agreement_samples=0)
        assert converted.statistics_program is None


def test_new_input_statistics_reach_the_program() -> None:
    converted = graphnorm.convert(conv_chain(), STATS3, input_shape=(1, 3, 8, 8), agreement_samples=0).eval()
    before = [t.clone() for t in converted.statistics_program(*converted.statistics_inputs())]
    converted.input_stats = graphnorm.InputStats(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([2.0, 1.0, 0.5]))
    after = converted.statistics_program(*converted.statistics_inputs())
    torch.testing.assert_close(after[0], _interpreted(converted)[0])
    assert not torch.allclose(before[1], after[1])


def test_one_program_serves_both_modes_unless_a_mode_flag_is_read() -> None:
    plain = graphnorm.convert(DigitsCNN(), STATS1, input_shape=(1, 1, 8, 8), agreement_samples=0)
    assert plain.statistics_program.eval_program is plain.statistics_program.train_program
    noisy = graphnorm.convert(DigitsCNN(), STATS1, input_shape=(1, 1, 8, 8), agreement_samples=0, stochastic_batch=8)
    with_dropout = graphnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4)), STATS3,
                                     input_shape=(1, 3, 6, 6), agreement_samples=0)
    for converted in (noisy, with_dropout):
        program = converted.statistics_program
        assert program.eval_program is not program.train_program
        converted.train()
        train_var = _programmed(converted)[-1]
        converted.eval()
        assert not torch.allclose(_programmed(converted)[-1], train_var)  # the modes' moments differ
