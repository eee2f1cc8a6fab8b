"""Saving and loading a converted model as people do: torch.save of the whole module, pickling into a spawned
process, copy.deepcopy, and a state_dict loaded into a freshly converted model. The reference is the model that
was saved: outputs must be identical, in every mode, in training (same seed) and in eval."""

from __future__ import annotations

import copy
import io
import multiprocessing

import pytest
import torch
from conversion_models import DigitsCNN

import graphnorm

STATS = graphnorm.InputStats.standard(1)
MODES = [("analytic", {}), ("reparam", {}), ("normprop", {}), ("fixed", {}), ("analytic", {"stochastic_batch": 8})]
IDS = ["analytic", "reparam", "normprop", "fixed", "stochastic"]
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _convert(mode: str, kwargs: dict) -> graphnorm.ConvertedModule:
    torch.manual_seed(0)
    return graphnorm.convert(DigitsCNN(), STATS, input_shape=(1, 1, 8, 8), mode=mode, agreement_samples=0, **kwargs)


def _outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    results = []
    for training in (True, False):
        model.train(training)
        torch.manual_seed(5)  # the same noise draws for stochastic normalization
        results.append(model(X).detach())
    return results


def _assert_same(model: torch.nn.Module, other: torch.nn.Module) -> None:
    for want, got in zip(_outputs(model), _outputs(other), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _trained(mode: str, kwargs: dict) -> graphnorm.ConvertedModule:
    """A converted model after one SGD step (weights not those of the conversion)."""
    model = _convert(mode, kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(X), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    return model


@pytest.mark.parametrize("mode, kwargs", MODES, ids=IDS)
def test_torch_save_and_load_of_the_whole_module(mode: str, kwargs: dict) -> None:
    model = _trained(mode, kwargs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, graphnorm.ConvertedModule)
    assert loaded.graphnorm_log.mode == mode
    _assert_same(model, loaded)
    for each in (model, loaded):  # trains after loading: the same gradients, through the statistics
        each.train().zero_grad()
        torch.manual_seed(5)
        each(X).square().sum().backward()
    for want, got in zip(model.parameters(), loaded.parameters(), strict=True):
        assert (want.grad is None) == (got.grad is None)
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


@pytest.mark.parametrize("mode, kwargs", MODES, ids=IDS)
def test_deepcopy_and_state_dict_into_a_fresh_conversion(mode: str, kwargs: dict) -> None:
    model = _trained(mode, kwargs)
    _assert_same(model, copy.deepcopy(model))
    fresh = _convert(mode, kwargs)
    fresh.load_state_dict(model.state_dict())
    _assert_same(model, fresh)


def _outputs_in_child(model: torch.nn.Module, queue: multiprocessing.Queue) -> None:
    queue.put([t.numpy() for t in _outputs(model)])


def test_pickled_into_a_spawned_process() -> None:
    model = _trained("analytic", {"stochastic_batch": 8})
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_outputs_in_child, args=(model, queue))
    process.start()
    try:
        received = queue.get(timeout=120)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    for want, got in zip(_outputs(model), received, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=0)
