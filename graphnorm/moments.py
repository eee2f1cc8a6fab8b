"""The value that moment propagation carries along every edge of the graph.

A :class:`Moments` describes the distribution of one activation (one sample, batch dim dropped) by its first
two moments, in one of two resolutions:

- **per channel** (``mean``/``var`` of shape ``[C]``): every spatial position of a channel is a draw from one
  distribution. This is AP2 of Shekhovtsov & Flach (2018); a rule then only needs kernels summed over space.
- **per unit** (maps of shape ``[C, *S]``): one mean and variance per channel and position, so zero padding at
  the borders is exact. The channel moments are then the mixture over positions:
  ``m_c = avg_p m_cp`` and ``v_c = avg_p (v_cp + m_cp**2) - m_c**2``.

Rules read whichever resolution they need: ``unit_mean``/``unit_var`` broadcast channel moments over space
(no copy), ``mean``/``var`` mix unit maps into channels. A richer representation (neighbour covariances, say)
would be one more optional field here; rules that do not know it keep working on mean and variance.

``correlation`` (set on the model input only, from :class:`~graphnorm.InputStats`) is a stationary
correlation template ``[C, C, 2r+1, ...]``: ``cov(x_cp, x_dq) = rho_cd(q - p) sigma_cp sigma_dq``. Linear
maps that read it (conv, linear) use it for an exact variance; every other rule ignores it, and no rule's
output carries it.

``third`` (``accuracy="accurate"``, :mod:`graphnorm.rules.skewness`) is the third central moment in the
stored resolution; linear maps and activations carry it, every other rule leaves it unset (Gaussian).

``neighbours`` (``accuracy="accurate"``, :mod:`graphnorm.rules.neighbours`) is a per-channel template
``rho_c(delta)`` ``[C, 2R+1, ...]`` of the correlation between positions of one channel; the rules that know
it (convolution, pooling, activations, adds) carry it, every other rule drops it (independent positions).

``channel_correlation`` (``accuracy="accurate"``, :mod:`graphnorm.rules.channel_correlation`) is the
``[C, C]`` correlation between channels at one position, carried through convolutions (within a cost
budget), pooling, activations, adds, gates and concatenation; every other rule drops it (independent channels).

``monotone_of`` records that this activation is ``f(X)`` for a non-decreasing elementwise ``f`` applied to a
Gaussian-modelled ``X``. Max-pooling uses it: ``maxpool(f(X)) = f(maxpool(X))`` exactly, so pooling the
Gaussian pre-activation and then applying ``f``'s rule avoids treating a rectified variable as Gaussian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

__all__ = ["Moments", "MonotoneSource"]


class MonotoneSource(NamedTuple):
    """Records that an activation is ``function(pre_activation)`` for a non-decreasing elementwise function,
    with the moment rule that maps the pre-activation's moments to it and, for piecewise-polynomial
    functions, their ``(breakpoints, pieces)`` (which allow exact moments over non-Gaussian inputs)."""

    function: Callable[[torch.Tensor], torch.Tensor]
    rule: Callable[[Moments], Moments]
    pre_activation: Moments
    piecewise: tuple[Any, Any] | None = None


@dataclass(frozen=True, eq=False)
class Moments:
    """Mean and variance of one activation of shape ``shape`` (no batch dim).

    ``loc`` and ``spread`` hold the stored resolution: ``[C]`` per channel, or ``[C, *S]`` per unit with
    ``S = shape[1:]``. Read them through ``mean``/``var`` (always per channel) or ``unit_mean``/``unit_var``
    (always ``shape``).
    """

    loc: torch.Tensor
    spread: torch.Tensor
    shape: tuple[int, ...]
    monotone_of: MonotoneSource | None = None
    correlation: torch.Tensor | None = None
    third: torch.Tensor | None = None
    neighbours: torch.Tensor | None = None
    channel_correlation: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if tuple(self.loc.shape) != tuple(self.spread.shape):
            raise ValueError(f"mean shape {tuple(self.loc.shape)} != var shape {tuple(self.spread.shape)}")
        if tuple(self.loc.shape) not in ((self.shape[0],), tuple(self.shape)):
            raise ValueError(f"moments of shape {tuple(self.loc.shape)} do not fit activation shape {self.shape}")

    # -- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def per_channel(cls, mean: torch.Tensor, var: torch.Tensor, shape: tuple[int, ...]) -> Moments:
        return cls(mean, var, tuple(shape))

    @classmethod
    def per_unit(cls, mean_map: torch.Tensor, var_map: torch.Tensor) -> Moments:
        return cls(mean_map, var_map, tuple(mean_map.shape))

    # -- views ----------------------------------------------------------------------------------------------
    @property
    def is_per_unit(self) -> bool:
        """True when positions carry their own moments (always False for 1-D feature vectors)."""
        return self.loc.dim() > 1

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def positions(self) -> int:
        """Number of spatial positions per channel (1 for feature vectors)."""
        count = 1
        for size in self.shape[1:]:
            count *= size
        return count

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean ``[C]`` (the average of the unit means)."""
        if not self.is_per_unit:
            return self.loc
        return self.loc.reshape(self.channels, -1).mean(dim=1)

    @property
    def var(self) -> torch.Tensor:
        """Per-channel variance ``[C]`` (the mixture over positions for per-unit moments)."""
        if not self.is_per_unit:
            return self.spread
        loc = self.loc.reshape(self.channels, -1)
        second = (self.spread.reshape(self.channels, -1) + loc.square()).mean(dim=1)
        return (second - loc.mean(dim=1).square()).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def unit_mean(self) -> torch.Tensor:
        """Mean per unit, shape ``shape`` (channel means broadcast over space, without a copy)."""
        return self.loc if self.is_per_unit else _broadcast(self.loc, self.shape)

    @property
    def unit_var(self) -> torch.Tensor:
        return self.spread if self.is_per_unit else _broadcast(self.spread, self.shape)

    @property
    def unit_third(self) -> torch.Tensor | None:
        """Third central moment per unit (None when not tracked)."""
        if self.third is None:
            return None
        return self.third if self.is_per_unit else _broadcast(self.third, self.shape)

    def with_third(self, third: torch.Tensor | None) -> Moments:
        return replace(self, third=third)

    def with_neighbours(self, neighbours: torch.Tensor | None) -> Moments:
        return replace(self, neighbours=neighbours)

    @property
    def unit_average_var(self) -> torch.Tensor:
        """Per-channel average of the unit variances ``[C]`` (the within-position spread, without the spread
        of the means across positions that ``var`` mixes in)."""
        return self.spread.reshape(self.channels, -1).mean(dim=1) if self.is_per_unit else self.spread

    # -- transformations -------------------------------------------------------------------------------------
    def to_channels(self) -> Moments:
        """The same activation summarized per channel (mixture over positions)."""
        if not self.is_per_unit:
            return self
        third = None
        if self.third is not None:  # third central moment of the mixture over positions
            loc = self.loc.reshape(self.channels, -1)
            offset = loc - loc.mean(dim=1, keepdim=True)
            third = (self.third.reshape(self.channels, -1) + 3 * self.spread.reshape(self.channels, -1) * offset
                     + offset.pow(3)).mean(dim=1)
        return Moments(self.mean, self.var, self.shape, self.monotone_of, third=third, neighbours=self.neighbours,
                       channel_correlation=self.channel_correlation)

    def with_monotone_source(self, source: MonotoneSource) -> Moments:
        return replace(self, monotone_of=source)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Moments:
        """Apply ``fn`` to mean and variance alike (detach, cast, ...); drops ``monotone_of``."""
        return Moments(fn(self.loc), fn(self.spread), self.shape)

    def __repr__(self) -> str:
        resolution = "unit" if self.is_per_unit else "channel"
        return (
            f"Moments(shape={self.shape}, per_{resolution}, mean~{self.mean.mean().item():.4g}, "
            f"std~{self.std.mean().item():.4g})"
        )


def _broadcast(channel_values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return channel_values.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape)
