"""The moment rules: one registry from op key to rule, and the rules themselves grouped by family.

A rule is a pure function ``rule(*inputs, out_shape, **params) -> Moments``: the random inputs come
positionally (as :class:`~graphnorm.Moments`, or plain tensors/numbers for constant operands), the static
parameters keyword-only, as the op's canonicalizer in :mod:`graphnorm.ops` produced them; ``out_shape`` is
the per-sample shape of the op's output (batch dim dropped), known from shape propagation.

Register your own with :func:`moment_rule`::

    @graphnorm.moment_rule("my_op")
    def my_op(x: Moments, *, out_shape, scale) -> Moments: ...
"""

from __future__ import annotations

from collections.abc import Callable

from ..moments import Moments

__all__ = ["RULES", "moment_rule"]

Rule = Callable[..., Moments]

RULES: dict[str, Rule] = {}


def moment_rule(key: str, *, replace: bool = False) -> Callable[[Rule], Rule]:
    """Register the decorated function as the moment rule of op ``key``."""

    def register(fn: Rule) -> Rule:
        if key in RULES and not replace and RULES[key] is not fn:
            raise ValueError(f"a moment rule for op '{key}' exists already; pass replace=True to override it")
        RULES[key] = fn
        return fn

    return register


# Importing the families registers their rules.
from . import (  # noqa: E402, F401
    activations,
    affine,
    feature_norms,
    layout,
    normalizers,
    pooling,
    products,
    reductions,
    structural,
)
