"""Train a converted digits CNN with DistributedDataParallel and no SyncBatchNorm.

    torchrun --nproc_per_node=2 examples/ddp_train.py               # one machine, 2 processes (gloo on CPU)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 examples/ddp_train.py   # and node_rank=1 on the other

A converted model's normalizers take their statistics from the weights, not from the batch, so each rank's
forward is independent of the others: DDP's gradient all-reduce is the only communication, and 2 ranks x
batch 4 compute exactly what one process computes on batch 8 (tests/test_distributed.py). With
``--stochastic-batch M`` the BatchNorm-like noise is drawn per rank from ``seed + rank``: runs are reproducible.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel

import graphnorm
from graphnorm.zoo import DigitsCNN  # conv-BN-ReLU-maxpool x 2 and a Linear, as users write it


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="analytic", choices=["analytic", "reparam", "normprop"])
    parser.add_argument("--stochastic-batch", type=int, default=None)
    parser.add_argument("--batch-per-rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")

    images, labels = digits()
    stats = graphnorm.InputStats.from_data(images)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = graphnorm.convert(DigitsCNN(), stats, input_shape=(1, 1, 8, 8), mode=args.mode,
                              stochastic_batch=args.stochastic_batch, agreement_samples=0).to(device)
    # The converted model's buffers (calibrations, the statistics program's constants) never change while
    # training, so DDP need not broadcast them at every forward: its gradient all-reduce is the only collective.
    model = DistributedDataParallel(model, forward_sync_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)  # every rank draws the same global batches
    global_batch = args.batch_per_rank * world
    for step in range(args.steps):
        index = torch.randint(0, len(images), (global_batch,), generator=generator)
        mine = index[rank * args.batch_per_rank:(rank + 1) * args.batch_per_rank]
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # per-rank noise, reproducible
        loss = F.cross_entropy(model(images[mine].to(device)), labels[mine].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        accuracy = (model(images.to(device)).argmax(1).cpu() == labels).float().mean().item()
    if rank == 0:
        print(f"accuracy on the 1797 digits: {accuracy:.3f} ({world} ranks x batch {args.batch_per_rank})")
    dist.barrier()  # every rank finished before any tears its process group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
