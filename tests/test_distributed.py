"""DistributedDataParallel without SyncBatchNorm: 2 gloo processes on 127.0.0.1 (bounded in time, killed on
failure) against one process on the whole batch (the reference)."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from ddp_worker import STEPS, build, train

WORLD = 2
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed(kind: str, tmp_path) -> dict:
    from ddp_worker import run

    out = str(tmp_path / f"{kind}-{time.monotonic_ns()}.pt")
    context = mp.start_processes(run, args=(WORLD, _free_port(), kind, out), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return torch.load(out, weights_only=True)


def _single_process(kind: str) -> dict:
    model = build(kind)
    train(model, WORLD, None, torch.device("cpu"))
    return model.state_dict()


def _worst_relative_gap(got: dict, want: dict) -> float:
    return max(float((got[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-12))
               for k in want if want[k].is_floating_point())


def test_converted_model_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path) -> None:
    result = _distributed("converted", tmp_path)
    assert _worst_relative_gap(result["state"], _single_process("converted")) < 1e-5
    counts = result["counts"]
    assert counts.pop("ddp_gradient_buckets") == counts.pop("all_reduce") > 0  # DDP's gradient all-reduce
    assert sum(counts.values()) == 0, counts  # and nothing else


def test_the_batchnorm_original_does_not(tmp_path) -> None:
    result = _distributed("batchnorm", tmp_path)
    assert _worst_relative_gap(result["state"], _single_process("batchnorm")) > 1e-3  # batch statistics per rank
    assert result["counts"].get("_broadcast_coalesced", 0) > 0  # its running statistics broadcast every forward


def test_stochastic_normalization_is_reproducible_with_per_rank_seeds(tmp_path) -> None:
    first, second = _distributed("stochastic", tmp_path), _distributed("stochastic", tmp_path)
    for key, value in first["state"].items():
        torch.testing.assert_close(second["state"][key], value, rtol=0, atol=0)
    assert _worst_relative_gap(first["state"], _single_process("converted")) > 1e-4  # the noise did act


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"SyncBatchNorm runs on GPUs only; needs {WORLD}")
def test_syncbatchnorm_matches_at_the_cost_of_its_collectives(tmp_path) -> None:
    result = _distributed("syncbn", tmp_path)
    reference = build("batchnorm")
    train(reference, WORLD, None, torch.device("cuda", 0))
    want = {k: v.cpu() for k, v in reference.state_dict().items()}
    assert _worst_relative_gap(result["state"], want) < 1e-4
    counts = result["counts"]
    extra = sum(counts.values()) - 2 * counts["ddp_gradient_buckets"]  # beyond DDP's (hook + its all_reduce)
    assert extra >= 2 * 2 * STEPS  # per BatchNorm and step: a gather in forward, an all-reduce in backward
