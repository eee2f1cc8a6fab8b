"""Input statistics beyond one mean and variance per channel, estimated from data in one streaming pass.

Real inputs are neither stationary nor white: a digit's border pixels are always blank, and neighbouring pixels
are strongly correlated. Two estimators describe that:

- :class:`UnitAccumulator`: mean and variance per channel *and* position (``[C, *S]`` maps), merged over
  batches with the parallel update of Chan, Golub & LeVeque (1979) in float64.
- :class:`OffsetCorrelation`: the correlation between channel ``c`` at position ``p`` and channel ``d`` at
  ``p + delta``, for every offset ``delta`` with ``|delta_i| <= radius``, averaged over positions (a stationary
  correlation template) as ``rho_cd(delta) = avg_p cov(x_cp, x_d,p+delta) / avg_p sigma_cp sigma_d,p+delta``.
  Together with the variance maps it models the covariance of any two inputs a kernel of width
  ``radius + 1`` reads: ``cov(x_cp, x_dq) ~ rho_cd(q - p) sigma_cp sigma_dq``, exact when the correlation
  does not depend on position. Feature vectors ``[N, F]`` (no spatial dims) get the full ``F x F``
  correlation matrix.

Raw cross-product sums per offset are accumulated; the centring by the mean maps happens once at the end, so
one pass over a DataLoader suffices and memory is ``O(C^2 (2 radius + 1)^dims + C prod(S))``.
"""

from __future__ import annotations

import itertools

import torch

from .errors import InputStatsError

__all__ = ["OffsetCorrelation", "StreamingMoments", "UnitAccumulator", "offset_slices"]


class StreamingMoments:
    """Streaming count, mean and sum of squared deviations, merged over batches in float64 with the parallel
    update of Chan, Golub & LeVeque (1979). Subclasses say which values of a batch are pooled and what each
    mean is of (``_batch_values``: ``[..., n]`` values, pooled over the last dim)."""

    mismatch = "data batches disagree on the shape of their statistics"

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def _batch_values(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add(self, batch: torch.Tensor) -> None:
        values = self._batch_values(batch.detach().to(torch.float64))
        count = values.shape[-1]
        if count == 0:
            return
        mean = values.mean(dim=-1)
        m2 = (values - mean.unsqueeze(-1)).square().sum(dim=-1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise InputStatsError(f"{self.mismatch}: {tuple(self.mean.shape)} then {tuple(mean.shape)}")
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        """Population variance."""
        if self.m2 is None:
            raise InputStatsError("no data was added")
        return self.m2 / self.count


class UnitAccumulator(StreamingMoments):
    """Mean and variance per unit (channel and position) of ``[N, C, *S]`` batches."""

    mismatch = "data batches disagree on the sample shape (per-position statistics need inputs of one size)"

    def _batch_values(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.movedim(0, -1)


def offset_slices(sizes: tuple[int, ...], offset: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``(P, Q)`` of a map of spatial ``sizes`` such that ``Q`` holds the positions ``p + offset`` of the
    positions ``p`` in ``P`` (both inside the map)."""
    first, second = [], []
    for size, shift in zip(sizes, offset, strict=True):
        first.append(slice(max(0, -shift), size - max(0, shift)))
        second.append(slice(max(0, shift), size + min(0, shift)))
    return tuple(first), tuple(second)


class OffsetCorrelation:
    """Streaming estimate of the stationary cross-channel correlation at spatial offsets up to ``radius``.

    ``result(mean_map, var_map, per_position)`` returns ``[C, C, 2r+1, ...]`` (one window dim per spatial
    dim; ``[F, F]`` for feature vectors) with ``[c, d, r + delta]`` the correlation of ``x_c`` at ``p`` with
    ``x_d`` at ``p + delta``. ``per_position`` centres and scales by the per-position maps (the model
    ``cov = rho sigma_p sigma_q``); otherwise by the channel mean and variance (the model every position is a
    draw of the channel's mixture).
    """

    def __init__(self, radius: int):
        if not isinstance(radius, int) or radius < 0:
            raise InputStatsError(f"patch_covariance must be a positive kernel width, got radius {radius!r}")
        self.radius = radius
        self.count = 0
        self.sums: dict[tuple[int, ...], torch.Tensor] = {}

    def offsets(self, dims: int) -> list[tuple[int, ...]]:
        return list(itertools.product(range(-self.radius, self.radius + 1), repeat=dims))

    def add(self, batch: torch.Tensor) -> None:
        values = batch.detach().to(torch.float64)
        sizes = tuple(values.shape[2:])
        for offset in self.offsets(len(sizes)):
            first, second = offset_slices(sizes, offset)
            a = values[(slice(None), slice(None), *first)].reshape(values.shape[0], values.shape[1], -1)
            b = values[(slice(None), slice(None), *second)].reshape(values.shape[0], values.shape[1], -1)
            product = torch.einsum("ncp,ndp->cd", a, b)
            self.sums[offset] = self.sums[offset] + product if offset in self.sums else product
        self.count += values.shape[0]

    def result(self, unit_mean: torch.Tensor, unit_var: torch.Tensor, per_position: bool) -> torch.Tensor:
        """The correlation template ``[C, C, *window]`` of data whose per-position moments are ``unit_mean``,
        ``unit_var`` (``[C, *S]``; see the class docstring)."""
        channels, sizes = unit_mean.shape[0], tuple(unit_mean.shape[1:])
        center, std = unit_mean, unit_var.clamp_min(0).sqrt()
        if not per_position:  # every position a draw of the channel mixture
            flat_mean, flat_var = unit_mean.reshape(channels, -1), unit_var.reshape(channels, -1)
            channel_mean = flat_mean.mean(1)
            channel_var = (flat_var + flat_mean.square()).mean(1) - channel_mean.square()
            shape = (-1,) + (1,) * len(sizes)
            center = channel_mean.reshape(shape).expand_as(unit_mean)
            std = channel_var.clamp_min(0).sqrt().reshape(shape).expand_as(unit_mean)
        width = 2 * self.radius + 1
        correlation = torch.zeros((channels, channels) + (width,) * len(sizes), dtype=torch.float64)
        for offset in self.offsets(len(sizes)):
            first, second = offset_slices(sizes, offset)

            def at(values: torch.Tensor, where: tuple[slice, ...]) -> torch.Tensor:
                return values[(slice(None), *where)].reshape(channels, -1)

            pairs = at(unit_mean, first).shape[1]
            if pairs == 0:
                continue
            c_p, c_q, e_p, e_q = at(center, first), at(center, second), at(unit_mean, first), at(unit_mean, second)
            # avg_p E[(x_cp - c_cp)(x_dq - c_dq)] = avg_p (E[x_cp x_dq] - c_cp E[x_dq] - E[x_cp] c_dq + c_cp c_dq)
            covariance = self.sums[offset] / (self.count * pairs) - (c_p @ e_q.T + e_p @ c_q.T - c_p @ c_q.T) / pairs
            scale = at(std, first) @ at(std, second).T / pairs
            index = (slice(None), slice(None), *(shift + self.radius for shift in offset))
            correlation[index] = torch.where(scale > 0, covariance / scale.clamp_min(1e-300),
                                             torch.zeros_like(covariance))
        return correlation.clamp(-1.0, 1.0)
