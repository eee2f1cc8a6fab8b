"""Training benchmark: does batch-independent normalization deliver what the papers claim, on real data?

Two data sets that fit a CPU: MNIST-1D (``mnist1d``, generated locally, 4000 train / 1000 test) with a 1-D CNN,
and sklearn's 8x8 digits (1400 train / 397 test) with graphnorm.zoo's DigitsCNN. Both networks are written
with BatchNorm; graphnorm's variants are made from that same network by ``graphnorm.convert``, GroupNorm and
"no normalization" by swapping the BatchNorm modules as a user would. Every variant sees the same number of
examples with the same optimizer (SGD, momentum 0.9, learning rate ``base * B/32``, cosine decay).

The batch-independent normalizers users pick today are the peers: GroupNorm, LayerNorm over channels (timm
``LayerNorm2d``), EvoNorm-S0 and FilterResponseNorm with TLU (timm; both replace the BatchNorm *and* the ReLU
after it, as they are designed to), with BatchNorm at batch 32 as the reference. Every run reports test accuracy,
test negative log-likelihood (NLL) and expected calibration error (ECE, 15 equal-width confidence bins) of the
eval-mode network; the noisy graphnorm variants (BatchNorm's noise of batch 32, ``+noise``; learned noise with
its KL term weighted 1/N_train, ``+learned``) also of the K-sample predictive (``graphnorm.predict``).

    python benchmarks/train.py --quick        # smoke run, under 2 minutes (part of the test suite)
    python benchmarks/train.py --workers 2    # the whole grid, 4 epochs
    python benchmarks/train.py --workers 2 --epochs 32 --batches 2 32 \\
        --variants batchnorm groupnorm evonorm_s0 frn_tlu analytic analytic+noise analytic+learned  # long schedule

A long grid records each finished run in ``results/NAME.journal.jsonl``; run the same command again after an
interruption and it resumes.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from common import RESULTS, GridRun, failures, grid_parser, markdown_table, run_grid, write_result

import graphnorm
from graphnorm.zoo import DigitsCNN

VARIANTS = ("batchnorm", "groupnorm", "layernorm", "evonorm_s0", "frn_tlu", "none", "analytic", "reparam",
            "normprop", "analytic+noise", "analytic+learned")
NOISY = ("analytic+noise", "analytic+learned")
PREDICTIVE_SAMPLES = 16
ECE_BINS = 15
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


class As2d(nn.Module):
    """A 2-D normalization layer applied to 1-D feature maps ``[N, C, L]`` as ``[N, C, L, 1]``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.unsqueeze(-1)).squeeze(-1) if x.dim() == 3 else self.layer(x)


def swap_norm_and_activation(model: nn.Module, make) -> nn.Module:
    """Every ``BatchNorm -> ReLU`` pair of a Sequential replaced by ``make(channels)`` (a normalization with its
    own activation, like EvoNorm and FRN+TLU) and an Identity."""
    swapped = copy.deepcopy(model)
    for sequential in [m for m in swapped.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(sequential) - 1):
            if isinstance(sequential[i], nn.modules.batchnorm._BatchNorm) and isinstance(sequential[i + 1], nn.ReLU):
                sequential[i], sequential[i + 1] = make(sequential[i].num_features), nn.Identity()
    return swapped


def variant(model: nn.Module, name: str, stats: graphnorm.InputStats, shape: tuple[int, ...]) -> nn.Module:
    import timm.layers

    if name == "batchnorm":
        return model
    if name == "groupnorm":
        return swap_batchnorm(model, lambda c: nn.GroupNorm(min(8, c), c))
    if name == "layernorm":
        return swap_batchnorm(model, lambda c: As2d(timm.layers.LayerNorm2d(c)))
    if name == "evonorm_s0":
        return swap_norm_and_activation(model, lambda c: As2d(timm.layers.EvoNorm2dS0(c, groups=min(8, c))))
    if name == "frn_tlu":
        return swap_norm_and_activation(model, lambda c: As2d(timm.layers.FilterResponseNormTlu2d(c)))
    if name == "analytic+learned":
        return graphnorm.convert(model, stats, input_shape=shape, mode="analytic", noise="learned",
                                 stochastic_batch=REFERENCE_BATCH)
    if name == "none":
        return swap_batchnorm(model, lambda c: nn.Identity())
    if name == "analytic+noise":
        return graphnorm.convert(model, stats, input_shape=shape, mode="analytic", stochastic_batch=REFERENCE_BATCH)
    return graphnorm.convert(model, stats, input_shape=shape, mode=name)


@dataclass
class Run(GridRun):
    train_limit: int | None = None


def sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int, steps: int, lr: float,
              seed: int, kl_weight: float = 0.0) -> tuple[list[float], str | None]:
    """``steps`` steps of SGD (momentum 0.9, cosine decay from ``lr``) on shuffled batches of ``batch`` examples,
    the loss plus ``kl_weight`` times :func:`graphnorm.kl_divergence` (learned noise). Returns the training
    losses and the error that stopped training early (None when it did not)."""
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
            if kl_weight:
                loss = loss + kl_weight * graphnorm.kl_divergence(model)
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


def expected_calibration_error(probabilities: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the mean over ``bins`` equal-width confidence bins of |accuracy - mean confidence|, weighted by the
    fraction of examples in the bin (Guo et al. 2017)."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == y).float()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    total = torch.zeros(bins).index_add_(0, index, torch.ones_like(confidence))
    gap = torch.zeros(bins).index_add_(0, index, confidence - correct).abs()
    return (gap.sum() / total.sum()).item()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` in eval mode (its modes are given back)."""
    return scores(graphnorm.predict(model, x, samples=0), y)["accuracy"]


def scores(probabilities: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL and ECE of predicted class probabilities."""
    return {"accuracy": (probabilities.argmax(1) == y).float().mean().item(),
            "nll": nn.functional.nll_loss(probabilities.clamp_min(1e-12).log(), y).item(),
            "ece": expected_calibration_error(probabilities, y)}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, predictive: bool) -> dict[str, float]:
    """Scores of the eval-mode network and, with ``predictive``, of the K-sample predictive; the model's modes
    are given back."""
    result = {f"test_{k}": v for k, v in scores(graphnorm.predict(model, x, samples=0), y).items()}
    if predictive:
        generator_state = torch.get_rng_state()
        torch.manual_seed(0)
        probabilities = graphnorm.predict(model, x, samples=PREDICTIVE_SAMPLES)
        torch.set_rng_state(generator_state)
        result |= {f"predictive_{k}": v for k, v in scores(probabilities, y).items()}
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
    kl_weight = 1.0 / len(y) if run.variant == "analytic+learned" else 0.0
    losses, error = sgd_steps(model, x, y, batch=run.batch, steps=steps, lr=lr, seed=run.seed, kl_weight=kl_weight)
    seconds = time.perf_counter() - start
    metrics = evaluate(model, x_test, y_test, run.variant in NOISY) if error is None else {}
    last_epoch = max(1, int(len(y) / run.batch))
    return {**asdict(run), "steps": steps, "lr": lr, "test_accuracy": metrics.get("test_accuracy"), **metrics,
            "error": error,
            "final_train_loss": statistics.fmean(losses[-last_epoch:]) if losses else None,
            "seconds_per_epoch": seconds / max(run.epochs, 1e-9)}


METRICS = ("test_accuracy", "test_nll", "test_ece", "predictive_accuracy", "predictive_nll", "predictive_ece")


def summarize(results: list[dict]) -> list[dict]:
    """Per (data set, variant, batch): mean and std over seeds of every metric, the final training loss, time."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["variant"], r["batch"]), []).append(r)
    rows = []
    for (dataset, name, batch), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]),
                                                                                kv[0][2])):
        row = {"dataset": dataset, "variant": name, "batch": batch, "seeds": len(runs), **failures(runs)}
        for metric in METRICS:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        losses = [r["final_train_loss"] for r in runs if r["final_train_loss"] is not None]
        row["accuracy_mean"], row["accuracy_std"] = row["test_accuracy_mean"], row["test_accuracy_std"]
        row["train_loss"] = statistics.fmean(losses) if losses else None
        row["seconds_per_epoch"] = statistics.fmean(r["seconds_per_epoch"] for r in runs)
        rows.append(row)
    return rows


def _cell(row: dict, metric: str, scale: float = 1.0, digits: int = 1) -> str:
    mean = row.get(f"{metric}_mean")
    if mean is None:
        return "-"
    return f"{scale * mean:.{digits}f} ± {scale * row[f'{metric}_std']:.{digits}f}"


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
    name = "train_quick" if args.quick else "train" if args.epochs == 4.0 else f"train_{args.epochs:g}epochs"
    start = time.perf_counter()
    results = run_grid(train_one, runs, args.workers, journal=None if args.quick else RESULTS / f"{name}.journal.jsonl")
    rows = summarize(results)
    path = write_result(name, {"args": vars(args), "seconds": time.perf_counter() - start, "runs": results,
                               "rows": rows})
    print(markdown_table(
        ["data", "variant", "batch", "test accuracy %", "test NLL", "test ECE %", "predictive accuracy %",
         "predictive NLL", "predictive ECE %", "final train loss", "s/epoch", "failed"],
        [[r["dataset"], r["variant"], str(r["batch"]), _cell(r, "test_accuracy", 100), _cell(r, "test_nll", 1, 3),
          _cell(r, "test_ece", 100), _cell(r, "predictive_accuracy", 100), _cell(r, "predictive_nll", 1, 3),
          _cell(r, "predictive_ece", 100), "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}",
          f"{r['seconds_per_epoch']:.1f}", f"{r['failed']}/{r['seeds']}"] for r in rows]))
    print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; written to {path.name}")


if __name__ == "__main__":
    main()
