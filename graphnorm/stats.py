"""Per-channel statistics of the model input: the starting point of moment propagation.

The channel is dim 1 of the model input (``[N, C, ...]``), or the feature dim of a 2-D input ``[N, F]``.
Every position of a channel is treated as a draw from the same distribution (stationarity), so a channel is
summarized by one mean and one variance. ``from_data`` streams: it merges per-batch sums with the parallel
update of Chan, Golub & LeVeque (1979) in float64, so a DataLoader over a large data set needs no more
memory than one batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import InputStatsError
from .unit_stats import OffsetCorrelation, StreamingMoments, UnitAccumulator

__all__ = ["ChannelAccumulator", "InputStats"]


def _as_vector(name: str, value: Any) -> torch.Tensor:
    try:
        vector = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputStatsError(f"input {name} must be a sequence of numbers, got {value!r}") from err
    if vector.dim() == 0:
        vector = vector.reshape(1)
    if vector.dim() != 1 or vector.numel() == 0:
        raise InputStatsError(
            f"input {name} must be a non-empty 1-D list with one value per channel, got shape {tuple(vector.shape)}"
        )
    if not torch.isfinite(vector).all():
        raise InputStatsError(f"input {name} has a NaN or infinite value: {vector.tolist()}")
    return vector


class InputStats:
    """Mean and variance per input channel, optionally with per-position maps and a correlation template.

    ``InputStats(mean, std)`` or ``InputStats(mean, var=var)``; a scalar broadcasts to every channel only
    when the other argument fixes the channel count. Values are kept in float64.

    Richer descriptions of real inputs (see :mod:`graphnorm.unit_stats`), usually from
    ``from_data(..., per_position=True, patch_covariance=k)``:

    - ``mean_map``/``var_map`` ``[C, *S]``: moments per channel and position (``mean``/``var`` are then their
      mixture over positions). Propagation starts per unit from them, so the first layers see where the
      input is bright, blank or noisy.
    - ``correlation`` ``[C, C, 2r+1, ...]``: the correlation of channel ``c`` at ``p`` with channel ``d`` at
      ``p + delta`` (``[F, F]`` for feature vectors). Convolutions and Linear layers reading the input then
      use the covariance ``rho sigma_p sigma_q`` of what they sum instead of assuming independence.
    """

    mean_map: torch.Tensor | None = None
    var_map: torch.Tensor | None = None
    correlation: torch.Tensor | None = None

    def __init__(self, mean: Any, std: Any = None, *, var: Any = None):
        if (std is None) == (var is None):
            raise InputStatsError("give exactly one of std= or var= together with the mean")
        mean_vector = _as_vector("mean", mean)
        spread_name = "std" if std is not None else "var"
        spread = _as_vector(spread_name, std if std is not None else var)
        if (spread < 0).any():
            raise InputStatsError(f"input {spread_name} must be >= 0, got {spread.tolist()}")
        if mean_vector.numel() != spread.numel():
            if mean_vector.numel() == 1:
                mean_vector = mean_vector.expand(spread.numel()).clone()
            elif spread.numel() == 1:
                spread = spread.expand(mean_vector.numel()).clone()
            else:
                raise InputStatsError(
                    f"input mean has {mean_vector.numel()} channels but {spread_name} has {spread.numel()}; "
                    "give one value per channel for both"
                )
        self.mean: torch.Tensor = mean_vector
        self.var: torch.Tensor = spread.square() if std is not None else spread

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def channels(self) -> int:
        return self.mean.numel()

    @classmethod
    def standard(cls, channels: int) -> InputStats:
        """N(0, 1) in every one of ``channels`` channels."""
        if not isinstance(channels, int) or channels < 1:
            raise InputStatsError(f"channels must be a positive integer, got {channels!r}")
        return cls(torch.zeros(channels), torch.ones(channels))

    @classmethod
    def per_position(cls, mean_map: Any, var_map: Any, *, correlation: Any = None) -> InputStats:
        """Statistics given per channel and position (``[C, *S]`` maps); the channel moments are their mixture."""
        mean_map = torch.as_tensor(mean_map, dtype=torch.float64).detach().clone()
        var_map = torch.as_tensor(var_map, dtype=torch.float64).detach().clone()
        if mean_map.shape != var_map.shape or mean_map.dim() < 2:
            raise InputStatsError(f"mean and variance maps must both be [C, *S] of one shape, got "
                                  f"{tuple(mean_map.shape)} and {tuple(var_map.shape)}")
        if not (torch.isfinite(mean_map).all() and torch.isfinite(var_map).all()) or (var_map < 0).any():
            raise InputStatsError("mean and variance maps must be finite, with variances >= 0")
        flat_mean, flat_var = mean_map.flatten(1), var_map.flatten(1)
        channel_mean = flat_mean.mean(1)
        channel_var = ((flat_var + flat_mean.square()).mean(1) - channel_mean.square()).clamp_min(0)
        stats = cls(channel_mean, var=channel_var)
        stats.mean_map, stats.var_map = mean_map, var_map
        return stats.with_correlation(correlation) if correlation is not None else stats

    def with_correlation(self, correlation: Any) -> InputStats:
        """A copy with the correlation template ``[C, C, 2r+1, ...]`` (or ``[F, F]``) set."""
        correlation = torch.as_tensor(correlation, dtype=torch.float64).detach().clone()
        channels = self.channels
        window = correlation.shape[2:]
        if (correlation.dim() < 2 or correlation.shape[:2] != (channels, channels)
                or any(size % 2 == 0 for size in window)):
            raise InputStatsError(f"correlation must be [C, C, 2r+1, ...] with C = {channels}, got "
                                  f"{tuple(correlation.shape)}")
        if not torch.isfinite(correlation).all() or correlation.abs().max() > 1 + 1e-6:
            raise InputStatsError("correlation values must be finite and within [-1, 1]")
        copy = InputStats(self.mean, var=self.var)
        copy.mean_map, copy.var_map, copy.correlation = self.mean_map, self.var_map, correlation
        return copy

    def channel_summary(self) -> InputStats:
        """The same input described by its per-channel mean and variance only."""
        return InputStats(self.mean, var=self.var)

    @property
    def is_per_position(self) -> bool:
        return self.mean_map is not None

    @classmethod
    def from_data(cls, data: Any, *, per_position: bool = False, patch_covariance: int | None = None
                  ) -> InputStats:
        """Mean and (population) variance of samples per channel, in one streaming pass.

        ``data`` is a tensor or array ``[N, C, ...]`` (or ``[N, F]``), or an iterable of such batches, or of
        ``(x, y, ...)`` tuples whose first element is the batch (a DataLoader works).

        ``per_position=True`` also keeps mean and variance maps per position (all samples must share one
        size). ``patch_covariance=k`` also estimates the correlation between any two inputs a ``k``-wide
        kernel reads (offsets up to ``k - 1`` along each spatial dim; the full feature correlation matrix
        for ``[N, F]`` data), see :mod:`graphnorm.unit_stats`.
        """
        if patch_covariance is not None and (not isinstance(patch_covariance, int) or patch_covariance < 1):
            raise InputStatsError(f"patch_covariance must be a kernel width >= 1, got {patch_covariance!r}")
        rich = per_position or patch_covariance is not None
        accumulator = _ValidatedChannelMoments()
        units = UnitAccumulator() if rich else None
        offsets = OffsetCorrelation(patch_covariance - 1) if patch_covariance is not None else None
        for batch in iter_batches(data):
            accumulator.add(batch)
            if units is not None:
                units.add(batch)
            if offsets is not None:
                offsets.add(batch)
        stats = accumulator.result()
        if units is None:
            return stats
        mean_map, var_map = units.mean, units.var
        positional = per_position and mean_map.dim() > 1  # feature vectors [N, F] have no positions
        if positional:
            stats = cls.per_position(mean_map, var_map)
        if offsets is not None:
            stats = stats.with_correlation(offsets.result(mean_map, var_map, positional))
        return stats

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A batch of shape ``shape`` (``[N, C, ...]``) drawn from N(mean_c, var_c) (or from the per-position
        maps), independent per entry. Statistics with a correlation template cannot be sampled this way: the
        draws would lack the correlation the propagation assumes."""
        self.validate_for(tuple(shape))
        if self.correlation is not None:
            raise InputStatsError("input statistics with a correlation template describe real data; measure "
                                  "on that data (data=...) rather than on independent Gaussian draws")
        noise = torch.randn(tuple(shape), generator=generator, dtype=dtype)
        if self.mean_map is not None:
            return self.mean_map.to(dtype) + self.var_map.sqrt().to(dtype) * noise
        broadcast = (1, -1) + (1,) * (len(shape) - 2)
        return self.mean.to(dtype).reshape(broadcast) + self.std.to(dtype).reshape(broadcast) * noise

    def validate_for(self, input_shape: tuple[int, ...]) -> None:
        """Raise unless these statistics fit a model input of ``input_shape`` (batch dim first)."""
        if len(input_shape) < 2:
            raise InputStatsError(
                f"input_shape {tuple(input_shape)} needs a batch dim and a channel dim, e.g. (1, 3, 32, 32)"
            )
        if input_shape[1] != self.channels:
            raise InputStatsError(
                f"input statistics have {self.channels} channels but input_shape {tuple(input_shape)} has "
                f"{input_shape[1]} in dim 1; give one mean/std per channel"
            )
        if self.mean_map is not None and tuple(self.mean_map.shape[1:]) != tuple(input_shape[2:]):
            raise InputStatsError(
                f"input statistics are per position for inputs of size {tuple(self.mean_map.shape[1:])} but "
                f"input_shape {tuple(input_shape)} has size {tuple(input_shape[2:])}; use the same size or "
                "per-channel statistics (per_position=False)")
        if self.correlation is not None and self.correlation.dim() - 2 not in (0, len(input_shape) - 2):
            raise InputStatsError(
                f"the input correlation has {self.correlation.dim() - 2} spatial dims but input_shape "
                f"{tuple(input_shape)} has {len(input_shape) - 2}")

    def __repr__(self) -> str:
        def fmt(values: torch.Tensor) -> str:
            shown = ", ".join(f"{v:.4g}" for v in values[:8].tolist())
            return f"[{shown}{', ...' if values.numel() > 8 else ''}]"

        extras = ""
        if self.mean_map is not None:
            extras += f", per_position={tuple(self.mean_map.shape[1:])}"
        if self.correlation is not None:
            extras += f", correlation={tuple(self.correlation.shape)}"
        return f"InputStats(channels={self.channels}, mean={fmt(self.mean)}, std={fmt(self.std)}{extras})"


def iter_batches(data: Any) -> Iterable[torch.Tensor]:
    """The tensor batches of ``data``: a tensor or array, or an iterable of them or of ``(x, ...)`` tuples."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        yield torch.as_tensor(data)
        return
    if not isinstance(data, Iterable):
        raise InputStatsError(f"data must be a tensor, an array or an iterable of batches, got {type(data).__name__}")
    for item in data:
        if isinstance(item, (tuple, list)):
            if not item:
                raise InputStatsError("data yielded an empty tuple; expected (x, ...) with x a batch [N, C, ...]")
            item = item[0]
        if not isinstance(item, (torch.Tensor, np.ndarray)):
            raise InputStatsError(f"data yielded a {type(item).__name__}; expected a tensor batch [N, C, ...]")
        yield torch.as_tensor(item)


class ChannelAccumulator(StreamingMoments):
    """Streaming per-channel (dim 1) count, mean and sum of squared deviations of batches ``[N, C, ...]``,
    merged in float64 with the parallel update of Chan, Golub & LeVeque (1979)."""

    mismatch = "data batches disagree on the channel count"

    def _batch_values(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.transpose(0, 1).reshape(batch.shape[1], -1)


class _ValidatedChannelMoments(ChannelAccumulator):
    """:class:`ChannelAccumulator` for user data: checks shapes and finiteness, gives :class:`InputStats`."""

    def add(self, batch: torch.Tensor) -> None:
        if batch.dim() < 2:
            raise InputStatsError(
                f"a data batch must have a batch dim and a channel dim [N, C, ...], got shape {tuple(batch.shape)}"
            )
        if not torch.isfinite(batch).all():
            raise InputStatsError("data holds NaN or infinite values; clean the data before computing statistics")
        super().add(batch)

    def result(self) -> InputStats:
        if self.mean is None or self.m2 is None or self.count < 2:
            raise InputStatsError("data holds fewer than 2 values per channel; give more samples")
        return InputStats(self.mean, var=self.var)
