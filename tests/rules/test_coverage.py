"""Every registered moment rule must be exercised by a Monte-Carlo case (cases.py)."""

from __future__ import annotations

import torch
from cases import BINARY_CASES, CASES

import graphnorm
from graphnorm import InputStats, MomentPropagator


def covered_keys() -> set[str]:
    keys = {case.key for case in BINARY_CASES}
    for case in CASES:
        module = case.build().double()
        module = module.train() if case.train else module.eval()
        propagator = MomentPropagator(module, (1, *case.shape), spatial=case.spatial, dtype=torch.float64)
        keys |= {info.op for info in propagator.info.values()}
        InputStats(case.mean, case.std).validate_for((1, *case.shape))
    return keys


def test_every_registered_rule_has_a_monte_carlo_case() -> None:
    missing = sorted(set(graphnorm.RULES) - covered_keys())
    assert not missing, f"rules without a Monte-Carlo case in tests/rules/cases.py: {missing}"
