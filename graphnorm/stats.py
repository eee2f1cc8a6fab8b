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
    """Mean and variance per input channel.

    ``InputStats(mean, std)`` or ``InputStats(mean, var=var)``; a scalar broadcasts to every channel only
    when the other argument fixes the channel count. Values are kept in float64.
    """

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
    def from_data(cls, data: Any) -> InputStats:
        """Per-channel mean and (population) variance of samples.

        ``data`` is a tensor or array ``[N, C, ...]`` (or ``[N, F]``), or an iterable of such batches, or of
        ``(x, y, ...)`` tuples whose first element is the batch (a DataLoader works).
        """
        accumulator = _ValidatedChannelMoments()
        for batch in iter_batches(data):
            accumulator.add(batch)
        return accumulator.result()

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A batch of shape ``shape`` (``[N, C, ...]``) drawn from N(mean_c, var_c), independent per entry."""
        self.validate_for(tuple(shape))
        broadcast = (1, -1) + (1,) * (len(shape) - 2)
        noise = torch.randn(tuple(shape), generator=generator, dtype=dtype)
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

    def __repr__(self) -> str:
        def fmt(values: torch.Tensor) -> str:
            shown = ", ".join(f"{v:.4g}" for v in values[:8].tolist())
            return f"[{shown}{', ...' if values.numel() > 8 else ''}]"

        return f"InputStats(channels={self.channels}, mean={fmt(self.mean)}, std={fmt(self.std)})"


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


class ChannelAccumulator:
    """Streaming per-channel (dim 1) count, mean and sum of squared deviations of batches ``[N, C, ...]``,
    merged in float64 with the parallel update of Chan, Golub & LeVeque (1979)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, batch: torch.Tensor) -> None:
        values = batch.detach().to(torch.float64).transpose(0, 1).reshape(batch.shape[1], -1)
        count = values.shape[1]
        if count == 0:
            return
        mean = values.mean(dim=1)
        m2 = (values - mean[:, None]).square().sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        if mean.numel() != self.mean.numel():
            raise InputStatsError(
                f"data batches disagree on the channel count: {self.mean.numel()} then {mean.numel()}")
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel."""
        if self.m2 is None:
            raise InputStatsError("no data was added")
        return self.m2 / self.count


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
