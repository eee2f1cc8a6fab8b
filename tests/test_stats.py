from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphnorm import InputStats, InputStatsError


def test_values_and_std_or_var() -> None:
    stats = InputStats([0.5, -1.0], [2.0, 0.5])
    assert stats.channels == 2
    assert stats.var.tolist() == [4.0, 0.25]
    assert InputStats([0.5, -1.0], var=[4.0, 0.25]).std.tolist() == [2.0, 0.5]


def test_scalar_broadcasts_to_the_other_argument() -> None:
    assert InputStats(0.0, [1.0, 2.0, 3.0]).mean.tolist() == [0.0, 0.0, 0.0]
    assert InputStats([1.0, 2.0], 1.0).std.tolist() == [1.0, 1.0]


def test_standard() -> None:
    stats = InputStats.standard(3)
    assert stats.mean.tolist() == [0.0] * 3 and stats.var.tolist() == [1.0] * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": [0.0, 1.0], "std": [1.0, -1.0]}, ">= 0"),
        ({"mean": [0.0, float("nan")], "std": [1.0, 1.0]}, "NaN"),
        ({"mean": [0.0, 1.0], "std": [1.0, float("nan")]}, "NaN"),
        ({"mean": [0.0, 1.0], "std": [1.0, 1.0, 1.0]}, "channels"),
        ({"mean": [], "std": []}, "non-empty"),
        ({"mean": [[0.0]], "std": [[1.0]]}, "1-D"),
        ({"mean": ["a"], "std": [1.0]}, "numbers"),
        ({"mean": [0.0]}, "exactly one"),
        ({"mean": [0.0], "std": [1.0], "var": [1.0]}, "exactly one"),
    ],
)
def test_bad_values_raise_a_clear_error(kwargs, message) -> None:
    with pytest.raises(InputStatsError, match=message):
        InputStats(**kwargs)


def test_standard_rejects_bad_channel_count() -> None:
    with pytest.raises(InputStatsError, match="positive integer"):
        InputStats.standard(0)


def test_validate_for_input_shape() -> None:
    stats = InputStats.standard(3)
    stats.validate_for((1, 3, 8, 8))
    with pytest.raises(InputStatsError, match="3 channels but input_shape"):
        stats.validate_for((1, 4, 8, 8))
    with pytest.raises(InputStatsError, match="batch dim and a channel dim"):
        stats.validate_for((3,))


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def test_from_data_tensor_matches_torch() -> None:
    x = torch.randn(50, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1) + 3.0
    stats = InputStats.from_data(x)
    mean, var = _reference(x)
    torch.testing.assert_close(stats.mean, mean)
    torch.testing.assert_close(stats.var, var)


def test_from_data_streams_a_loader_of_pairs_and_arrays() -> None:
    x = torch.randn(90, 2, 5) + torch.tensor([10.0, -5.0]).reshape(1, 2, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(90)), batch_size=16)
    mean, var = _reference(x)
    stats = InputStats.from_data(loader)
    torch.testing.assert_close(stats.mean, mean)
    torch.testing.assert_close(stats.var, var)
    from_arrays = InputStats.from_data([x[:40].numpy(), x[40:].numpy()])
    torch.testing.assert_close(from_arrays.var, var)
    assert np.allclose(InputStats.from_data(x.numpy()).mean.numpy(), mean.numpy())


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=6),
       offset=st.floats(min_value=-1e4, max_value=1e4), seed=st.integers(0, 2**16))
def test_streaming_equals_one_pass_whatever_the_batch_split(sizes, offset, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 2, 3, generator=generator, dtype=torch.float64) + offset
    if x.shape[0] * 3 < 2:
        return
    stats = InputStats.from_data(list(torch.split(x, sizes)))
    mean, var = _reference(x)
    torch.testing.assert_close(stats.mean, mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.var, var, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "fewer than 2"),
        (torch.ones(1, 3), "fewer than 2"),
        ([torch.ones(2, 3), torch.ones(2, 4)], "disagree"),
        (torch.ones(5), "batch dim and a channel dim"),
        ([torch.tensor([[float("nan"), 1.0]] * 3)], "NaN"),
        (42, "iterable"),
        (["text"], "expected a tensor"),
    ],
)
def test_from_data_errors(data, message) -> None:
    with pytest.raises(InputStatsError, match=message):
        InputStats.from_data(data)
