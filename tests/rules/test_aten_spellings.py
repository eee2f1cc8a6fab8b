"""The ATen spellings (graphs captured by torch.export) against the torch spellings, whose moments
test_montecarlo.py checks against Monte Carlo: every case of cases.py, exported, gives the same moments."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
from cases import CASES, Case

import graphnorm
from graphnorm import InputStats
from graphnorm.ops import op_key
from graphnorm.rules import RULES


def export(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype):
    example = torch.randn((2, *shape[1:]), dtype=dtype)
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def _exportable(case: Case) -> bool:
    """Training-mode cases draw random masks or noise; a converted model's normalizers read statistics that its
    forward does not compute (torch.export records them as constants, here at the float32 precision they were
    computed in), so its graph is not the converted graph the fx path propagates through."""
    return not case.train and not case.id.startswith("converted-")


@pytest.mark.parametrize("case", [c for c in CASES if _exportable(c)], ids=lambda c: c.id)
def test_aten_spellings_give_the_moments_of_the_torch_spellings(case: Case) -> None:
    """Every Monte-Carlo case (tests/rules/cases.py), captured by torch.export: the ATen graph's moments equal
    those of the symbolically traced graph, which test_montecarlo checks against Monte Carlo."""
    module = case.build().double().eval()
    shape = (1, *case.shape)
    stats = InputStats(case.mean, case.std)
    traced = graphnorm.MomentPropagator(module, shape, spatial=case.spatial, dtype=torch.float64)
    try:
        program = export(module, shape, torch.float64)
    except Exception as err:  # the case's model is not exportable: nothing to compare
        pytest.skip(f"torch.export cannot capture this case: {str(err).splitlines()[0][:100]}")
    exported = graphnorm.MomentPropagator(program, shape, spatial=case.spatial, dtype=torch.float64)
    assert len(exported.sampled) <= len(traced.sampled), f"sampled only after export: {exported.sampled}"
    with torch.no_grad():
        expected = traced.run(stats)["output"]
        result = exported.run(stats)["output"]
    if case.spatial:
        torch.testing.assert_close(result.unit_mean, expected.unit_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.unit_var, expected.unit_var, rtol=1e-9, atol=1e-12)
    else:
        torch.testing.assert_close(result.mean, expected.mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.var, expected.var, rtol=1e-9, atol=1e-12)


def test_every_aten_spelling_has_a_rule() -> None:
    from graphnorm.ops import _FUNCTIONS

    aten_keys = {spelling.key for target, spelling in _FUNCTIONS.items() if isinstance(target, torch._ops.OpOverload)}
    assert aten_keys and aten_keys <= set(RULES) | {"getitem"}
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.aten.mean.dim, (x, [2, 3], True))
    assert op_key(node, nn.Module()) == "mean"
    assert op_key(graph.call_function(operator.getitem, (node, 0)), nn.Module()) == "getitem"
