"""Normalization of the arguments torch's conv and pooling ops accept as a number or a per-dim sequence."""

from __future__ import annotations

__all__ = ["as_tuple"]


def as_tuple(value, dims: int) -> tuple[int, ...]:
    """``stride=2`` or ``stride=(2, 2)`` (kernel size, padding, dilation) as a ``dims``-tuple."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
