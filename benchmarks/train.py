"""Training benchmark: does batch-independent normalization deliver what the papers claim, on real data?

Two data sets that fit a CPU: MNIST-1D (``mnist1d``, generated locally, 4000 train / 1000 test) with a 1-D CNN,
and sklearn's 8x8 digits (1400 train / 397 test) with graphnorm.zoo's DigitsCNN. Both networks are written
with BatchNorm; graphnorm's variants are made from that same network by ``graphnorm.convert``, GroupNorm and
"no normalization" by swapping the BatchNorm modules as a user would. Every variant sees the same number of
examples with the same optimizer (SGD, momentum 0.9, learning rate ``base * B/32``, cosine decay).

    python benchmarks/train.py --quick        # smoke run, under 2 minutes (part of the test suite)
    python benchmarks/train.py --workers 2    # the whole grid
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from common import GridRun, failures, grid_parser, markdown_table, run_grid, write_result

import graphnorm
from graphnorm.zoo import DigitsCNN

VARIANTS = ("batchnorm", "groupnorm", "none", "analytic", "reparam", "normprop", "analytic+noise")
BATCH_SIZES = (1, 2, 4, 8, 32)
REFERENCE_BATCH = 32


class MNIST1DNet(nn.Module):
    """A 1-D CNN for MNIST-1D signals of length 40, with BatchNorm."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU())
        self.head = nn.Linear(width * 10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def load(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        def as_signal(a):
            return torch.tensor(a, dtype=torch.float32).unsqueeze(1)
        return as_signal(data["x"]), torch.tensor(data["y"]), as_signal(data["x_test"]), torch.tensor(data["y_test"])
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order[:1400]], labels[order[:1400]], images[order[1400:]], labels[order[1400:]]


def network(dataset: str) -> nn.Module:
    return MNIST1DNet() if dataset == "mnist1d" else DigitsCNN()


def swap_batchnorm(model: nn.Module, make) -> nn.Module:
    swapped = copy.deepcopy(model)
    for name, module in list(swapped.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            swapped.set_submodule(name, make(module.num_features))
    return swapped


def variant(model: nn.Module, name: str, stats: graphnorm.InputStats, shape: tuple[int, ...]) -> nn.Module:
    if name == "batchnorm":
        return model
    if name == "groupnorm":
        return swap_batchnorm(model, lambda c: nn.GroupNorm(min(8, c), c))
    if name == "none":
        return swap_batchnorm(model, lambda c: nn.Identity())
    if name == "analytic+noise":
        return graphnorm.convert(model, stats, input_shape=shape, mode="analytic", stochastic_batch=REFERENCE_BATCH)
    return graphnorm.convert(model, stats, input_shape=shape, mode=name)


@dataclass
class Run(GridRun):
    train_limit: int | None = None


def sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int, steps: int, lr: float,
              seed: int) -> tuple[list[float], str | None]:
    """``steps`` steps of SGD (momentum 0.9, cosine decay from ``lr``) on shuffled batches of ``batch`` examples.
    Returns the training losses and the error that stopped training early (None when it did not)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    order, cursor, losses = torch.randperm(len(y), generator=generator), 0, []
    for _ in range(steps):
        if cursor + batch > len(y):
            order, cursor = torch.randperm(len(y), generator=generator), 0
        indices = order[cursor: cursor + batch]
        cursor += batch
        try:
            loss = nn.functional.cross_entropy(model(x[indices]), y[indices])
        except (RuntimeError, ValueError) as err:
            return losses, str(err).splitlines()[0]
        if not math.isfinite(loss.item()):
            return losses, "diverged (non-finite loss)"
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses, None


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` in eval mode (its mode is given back)."""
    training = model.training
    model.eval()
    with torch.no_grad():
        result = (model(x).argmax(1) == y).float().mean().item()
    model.train(training)
    return result


def train_one(run: Run) -> dict:
    torch.set_num_threads(1)
    x, y, x_test, y_test = load(run.dataset)
    if run.train_limit:
        x, y = x[: run.train_limit], y[: run.train_limit]
    stats = graphnorm.InputStats.from_data(x)
    torch.manual_seed(run.seed)
    model = variant(network(run.dataset), run.variant, stats, (1, *x.shape[1:])).train()
    steps = max(1, int(run.epochs * len(y) / run.batch))
    lr = run.base_lr * run.batch / REFERENCE_BATCH
    start = time.perf_counter()
    losses, error = sgd_steps(model, x, y, batch=run.batch, steps=steps, lr=lr, seed=run.seed)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, x_test, y_test) if error is None else None
    last_epoch = max(1, int(len(y) / run.batch))
    return {**asdict(run), "steps": steps, "lr": lr, "test_accuracy": test_accuracy, "error": error,
            "final_train_loss": statistics.fmean(losses[-last_epoch:]) if losses else None,
            "seconds_per_epoch": seconds / max(run.epochs, 1e-9)}


def summarize(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["variant"], r["batch"]), []).append(r)
    rows = []
    for (dataset, name, batch), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]),
                                                                                kv[0][2])):
        accuracies = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
        losses = [r["final_train_loss"] for r in runs if r["final_train_loss"] is not None]
        rows.append({"dataset": dataset, "variant": name, "batch": batch, "seeds": len(runs), **failures(runs),
                     "accuracy_mean": statistics.fmean(accuracies) if accuracies else None,
                     "accuracy_std": statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0,
                     "train_loss": statistics.fmean(losses) if losses else None,
                     "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs)})
    return rows


def main() -> None:
    parser = grid_parser(__doc__.splitlines()[0], variants=VARIANTS, batches=BATCH_SIZES,
                         quick="smoke run: digits, batch 2 and 32, 1 seed, 1 epoch")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--base-lr", type=float, default=0.05)
    args = parser.parse_args()
    limit = None
    if args.quick:
        args.datasets, args.batches, args.seeds, args.epochs, limit = ["digits"], [2, 32], 1, 1.0, 400
    runs = [Run(d, v, b, s, args.epochs, args.base_lr, limit) for d in args.datasets for v in args.variants
            for b in args.batches for s in range(args.seeds)]
    start = time.perf_counter()
    results = run_grid(train_one, runs, args.workers)
    rows = summarize(results)
    name = "train_quick" if args.quick else "train"
    path = write_result(name, {"args": vars(args), "seconds": time.perf_counter() - start, "runs": results,
                               "rows": rows})
    print(markdown_table(["data", "variant", "batch", "test accuracy (mean ± std)", "final train loss",
                          "s/epoch", "failed"],
                         [[r["dataset"], r["variant"], str(r["batch"]),
                           "-" if r["accuracy_mean"] is None else f"{100 * r['accuracy_mean']:.1f} ± "
                                                                    f"{100 * r['accuracy_std']:.1f}",
                           "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}",
                           f"{r['seconds_per_epoch']:.1f}", f"{r['failed']}/{r['seeds']}"] for r in rows]))
    print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; written to {path.name}")


if __name__ == "__main__":
    main()
