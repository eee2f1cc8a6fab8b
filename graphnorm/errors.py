"""One exception hierarchy for graphnorm.

Every message says what is wrong, where, and how to fix it, in a line or two. Only the CLI turns these into
exit codes; the library raises them and lets the caller decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class GraphnormError(Exception):
    """Base class of every error graphnorm raises on purpose."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message, or its type name when the message is empty (so that a
    message built from another library's error is never empty and never fails on an empty one)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class ModelLoadError(GraphnormError):
    """The model, its weights or its input data could not be loaded as given."""


class InputStatsError(GraphnormError, ValueError):
    """Input statistics are malformed (wrong length, negative or non-finite values, empty data)."""


class TraceError(GraphnormError):
    """torch.fx could not trace the model; the message names the module and source line that broke it."""


class RuleError(GraphnormError):
    """A moment rule was called with arguments it cannot handle (e.g. a reshape that mixes the batch dim)."""


@dataclass(frozen=True)
class UnsupportedOp:
    """One graph node that carries a random activation but has no moment rule."""

    node: str
    op: str
    target: str
    module_path: str | None

    def describe(self) -> str:
        where = f" in module '{self.module_path}'" if self.module_path else ""
        return f"op '{self.op}' ({self.target}) at node '{self.node}'{where}"


class UnsupportedOpError(GraphnormError):
    """The graph holds ops without a moment rule. Lists all of them at once, not only the first."""

    def __init__(self, ops: Sequence[UnsupportedOp]):
        self.ops = list(ops)
        listing = "\n".join(f"  - {op.describe()}" for op in self.ops)
        super().__init__(
            f"no moment rule for {len(self.ops)} op(s) in the graph:\n{listing}\n"
            "Register a rule with @graphnorm.moment_rule('<op key>') and map the module type or function to "
            "that key with graphnorm.register_op(...), or trace the module as a leaf "
            "(leaf_modules=...) and register a rule for it."
        )
