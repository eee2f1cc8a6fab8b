"""What each rank of tests/test_distributed.py runs (a module of its own so that spawned processes import it)."""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conversion_models import DigitsCNN
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import graphnorm

STEPS = 3
BATCH_PER_RANK = 4
STATS = graphnorm.InputStats.standard(1)
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
                "reduce_scatter_tensor", "all_to_all_single", "_broadcast_coalesced")  # the last: DDP's buffer sync


def build(kind: str) -> torch.nn.Module:
    """The model of a run: "batchnorm" (the original), "syncbn", "converted", or "stochastic" (converted with
    BatchNorm noise of a virtual batch 8)."""
    torch.manual_seed(0)
    model = DigitsCNN()
    if kind == "syncbn":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if kind in ("converted", "stochastic"):
        return graphnorm.convert(model, STATS, input_shape=(1, 1, 8, 8), agreement_samples=0,
                                 stochastic_batch=8 if kind == "stochastic" else None)
    return model


def ddp_options(kind: str) -> dict:
    """A converted model's buffers (calibrations, the statistics program's constants) never change in training:
    DDP need not broadcast them at every forward, as it must a BatchNorm's running statistics."""
    if kind in ("converted", "stochastic"):
        return {"forward_sync_buffers": False}
    return {}


def batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    size = BATCH_PER_RANK * world
    return [(torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator))
            for _ in range(STEPS)]


def train(model: torch.nn.Module, world: int, rank: int | None, device: torch.device) -> None:
    """SGD steps on rank ``rank``'s slice of each global batch of ``world`` ranks (the whole batch for
    ``rank=None``: the single-process reference); noise seeded per rank and step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step, (x, y) in enumerate(batches(world)):
        rows = slice(None) if rank is None else slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        torch.manual_seed(1000 * step + (rank or 0))
        optimizer.zero_grad()
        F.cross_entropy(model(x[rows].to(device)), y[rows].to(device)).backward()
        optimizer.step()


def _count_collectives(counts: Counter) -> None:
    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def run(rank: int, world: int, port: int, kind: str, out: str) -> None:
    """One rank: DDP training, then rank 0 saves the parameters and the collectives counted during training."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    use_cuda = kind == "syncbn" or os.environ.get("GRAPHNORM_TEST_CUDA") == "1"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model = DistributedDataParallel(build(kind).to(device), **ddp_options(kind))
        counts: Counter = Counter()

        def hook(state, bucket):
            counts["ddp_gradient_buckets"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        model.register_comm_hook(None, hook)
        _count_collectives(counts)
        train(model, world, rank, device)
        if rank == 0:
            torch.save({"state": {k: v.cpu() for k, v in model.module.state_dict().items()}, "counts": dict(counts)},
                       out)
        # Both ranks done before either tears down: a rank that destroys its gloo group while its peer still
        # talks to it can abort the peer ("terminate called without an active exception"), seen once in CI.
        dist.barrier()
    finally:
        dist.destroy_process_group()
