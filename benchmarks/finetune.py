"""Fine-tuning benchmark: adapt a network trained with BatchNorm to a shifted task at tiny batch sizes.

Start from a network trained with BatchNorm at batch 32 (the bundled digits CNN, ``fixtures/digits_cnn.pt``;
an MNIST-1D 1-D CNN trained here at batch 32 for 8 epochs, seed 0), then fine-tune on a *shifted* version of
its task, a change of sensor: every input becomes ``0.5 roll(x) + 0.3 + noise`` (gain 0.5, offset 0.3, a
translation by one pixel down and right for the 8x8 digits or by 4 samples for MNIST-1D, Gaussian noise of std
0.1, drawn once with a fixed seed). The pretrained network is at chance-to-mediocre on the shifted inputs; the
fine-tuning set is 500 shifted training examples, the test set the shifted held-out split.

How the BatchNorms are handled during fine-tuning, everything else equal (SGD, momentum 0.9, cosine decay,
learning rate ``base * B/32``, the same number of examples; the base learning rate is chosen per variant, data
set and batch size from a small grid by the accuracy on 500 other shifted training examples, as a user tuning
on a validation set would):

- ``batchnorm``: BatchNorm in train mode (batch statistics; running statistics updated, used in eval);
- ``frozen``: ``torchvision.ops.FrozenBatchNorm2d`` (statistics and affine frozen, what detection models do);
- ``bn-eval``: BatchNorm kept in eval mode (running statistics frozen, affine trained), the model otherwise
  unchanged;
- ``analytic``, ``reparam``, ``normprop``: ``graphnorm.convert`` with calibration to the running statistics
  (the default), input statistics of the fine-tuning set;
- ``analytic-data``: ``graphnorm.convert(mode="analytic", calibrate="data")`` on the fine-tuning set (the
  normalizers start at the statistics of the new data, then follow the weights);
- ``analytic-adapt``: ``graphnorm.convert(mode="analytic")`` with the input statistics of the *original*
  training data (those the running statistics were measured under), then ``converted.input_stats`` set to the
  statistics of the fine-tuning set: adaptation to the new inputs from their mean and std alone, no pass over
  them.

Accuracy on the shifted test set is recorded before fine-tuning (step 0) and after.

    python benchmarks/finetune.py --quick        # smoke run (part of the test suite)
    python benchmarks/finetune.py --workers 2    # the whole grid (batch sizes 1, 2, 8; 3 seeds)
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from common import GridRun, failures, grid_parser, markdown_table, run_grid, write_result
from torchvision.ops import FrozenBatchNorm2d
from train import accuracy, load, network, sgd_steps

import graphnorm
from graphnorm.loading import load_model

VARIANTS = ("batchnorm", "frozen", "bn-eval", "analytic", "reparam", "normprop", "analytic-data", "analytic-adapt")
BATCH_SIZES = (1, 2, 8)
REFERENCE_BATCH = 32
FINETUNE_EXAMPLES = 500
DIGITS_CHECKPOINT = Path(__file__).resolve().parent.parent / "fixtures" / "digits_cnn.pt"


def shifted(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The sensor change: gain 0.5, offset 0.3, a translation, Gaussian noise of std 0.1."""
    dims = tuple(range(2, x.dim()))
    steps = (1,) * len(dims) if len(dims) == 2 else (4,)
    rolled = torch.roll(x, shifts=steps, dims=dims)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return 0.5 * rolled + 0.3 + 0.1 * noise


def pretrained(dataset: str) -> nn.Module:
    """The network trained with BatchNorm on the original task (eval mode)."""
    if dataset == "digits":
        return load_model(str(DIGITS_CHECKPOINT)).model.eval()
    x, y, _, _ = load(dataset)
    torch.manual_seed(0)
    model = network(dataset).train()
    sgd_steps(model, x, y, batch=REFERENCE_BATCH, steps=8 * len(y) // REFERENCE_BATCH, lr=0.05, seed=0)
    return model.eval()


class FrozenBatchNorm(nn.Module):
    """``torchvision.ops.FrozenBatchNorm2d`` for any input rank (1-D signals get a dummy spatial dim)."""

    def __init__(self, batch_norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.frozen = FrozenBatchNorm2d(batch_norm.num_features, eps=batch_norm.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(self.frozen, name).copy_(getattr(batch_norm, name).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return self.frozen(x)
        return self.frozen(x.reshape(*x.shape[:2], -1, 1)).reshape(x.shape)


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def prepare(model: nn.Module, name: str, x_finetune: torch.Tensor, x_pretrain: torch.Tensor) -> nn.Module:
    """The pretrained model set up for fine-tuning as ``name`` says (a copy; the model is not changed)."""
    if name in ("batchnorm", "bn-eval"):
        return copy.deepcopy(model).train()
    if name == "frozen":
        frozen = copy.deepcopy(model)
        for path, module in batch_norms(frozen):
            frozen.set_submodule(path, FrozenBatchNorm(module))
        return frozen.train()
    stats = graphnorm.InputStats.from_data(x_finetune)
    shape = (1, *x_finetune.shape[1:])
    if name == "analytic-data":
        converted = graphnorm.convert(model, stats, input_shape=shape, mode="analytic", calibrate="data",
                                      data=x_finetune, agreement_samples=0)
    elif name == "analytic-adapt":
        converted = graphnorm.convert(model, graphnorm.InputStats.from_data(x_pretrain), input_shape=shape,
                                      mode="analytic", agreement_samples=0)
        converted.input_stats = stats
    else:
        converted = graphnorm.convert(model, stats, input_shape=shape, mode=name, agreement_samples=0)
    return converted.train()


@dataclass
class Run(GridRun):
    examples: int


VALIDATION_EXAMPLES = 500


def finetune_one(run: Run, model: nn.Module) -> dict:
    torch.set_num_threads(1)
    x, y, x_test, y_test = load(run.dataset)
    x_finetune, y_finetune = shifted(x[: run.examples], seed=1), y[: run.examples]
    end = run.examples + VALIDATION_EXAMPLES
    x_validation, y_validation = shifted(x[run.examples: end], seed=3), y[run.examples: end]
    x_test = shifted(x_test, seed=2)
    torch.manual_seed(run.seed)
    tuned = prepare(model, run.variant, x_finetune, x)
    before = accuracy(tuned, x_test, y_test)
    if run.variant == "bn-eval":
        for _, module in batch_norms(tuned):
            module.eval()
    steps = max(1, int(run.epochs * len(y_finetune) / run.batch))
    lr = run.base_lr * run.batch / REFERENCE_BATCH
    start = time.perf_counter()
    losses, error = sgd_steps(tuned, x_finetune, y_finetune, batch=run.batch, steps=steps, lr=lr, seed=run.seed)
    seconds = time.perf_counter() - start
    return {**asdict(run), "steps": steps, "lr": lr, "accuracy_before": before, "error": error,
            "accuracy_after": accuracy(tuned, x_test, y_test) if error is None else None,
            "validation_after": accuracy(tuned, x_validation, y_validation) if error is None else None,
            "final_train_loss": statistics.fmean(losses[-max(1, len(losses) // 5):]) if losses else None,
            "seconds": seconds}


def _finetune_star(arguments: tuple[Run, nn.Module]) -> dict:
    return finetune_one(*arguments)


def summarize(results: list[dict]) -> list[dict]:
    """One row per data set, variant and batch size, at the base learning rate with the best mean validation
    accuracy (a failed run counts as 0)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["variant"], r["batch"], r["base_lr"]), []).append(r)
    best: dict[tuple, tuple[float, float]] = {}
    for (dataset, name, batch, base_lr), runs in groups.items():
        validation = statistics.fmean(r["validation_after"] or 0.0 for r in runs)
        if (dataset, name, batch) not in best or validation > best[(dataset, name, batch)][0]:
            best[(dataset, name, batch)] = (validation, base_lr)
    rows = []
    for (dataset, name, batch), (validation, base_lr) in sorted(
            best.items(), key=lambda kv: (kv[0][0], kv[0][2], VARIANTS.index(kv[0][1]))):
        runs = groups[(dataset, name, batch, base_lr)]
        after = [r["accuracy_after"] for r in runs if r["accuracy_after"] is not None]
        rows.append({"dataset": dataset, "variant": name, "batch": batch, "base_lr": base_lr, "seeds": len(runs),
                     **failures(runs),
                     "before": statistics.fmean(r["accuracy_before"] for r in runs),
                     "validation": validation,
                     "after_mean": statistics.fmean(after) if after else None,
                     "after_std": statistics.pstdev(after) if len(after) > 1 else 0.0,
                     "seconds": statistics.fmean(r["seconds"] for r in runs)})
    return rows


def main() -> None:
    parser = grid_parser(__doc__.splitlines()[0], variants=VARIANTS, batches=BATCH_SIZES,
                         quick="smoke run: digits, batch 2, 1 seed, 100 examples")
    parser.add_argument("--epochs", type=float, default=5.0, help="passes over the fine-tuning set")
    parser.add_argument("--base-lrs", type=float, nargs="+", default=[0.005, 0.02, 0.08, 0.32],
                        help="learning rates at batch 32 (scaled by B/32) to choose from by validation accuracy")
    parser.add_argument("--examples", type=int, default=FINETUNE_EXAMPLES)
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.batches, args.seeds, args.epochs, args.examples = ["digits"], [2], 1, 1.0, 100
        args.base_lrs = [0.02]
    start = time.perf_counter()
    models = {dataset: pretrained(dataset) for dataset in args.datasets}
    jobs = [(Run(d, v, b, s, args.epochs, lr, args.examples), models[d]) for d in args.datasets
            for v in args.variants for b in args.batches for lr in args.base_lrs for s in range(args.seeds)]
    results = run_grid(_finetune_star, jobs, args.workers)
    rows = summarize(results)
    name = "finetune_quick" if args.quick else "finetune"
    path = write_result(name, {"args": vars(args), "seconds": time.perf_counter() - start, "runs": results,
                               "rows": rows})
    print(markdown_table(
        ["data", "batch", "variant", "base lr", "step 0", "after fine-tuning (mean ± std)", "s/run", "failed"],
        [[r["dataset"], str(r["batch"]), r["variant"], f"{r['base_lr']:g}", f"{100 * r['before']:.1f}",
          "-" if r["after_mean"] is None else f"{100 * r['after_mean']:.1f} ± {100 * r['after_std']:.1f}",
          f"{r['seconds']:.1f}", f"{r['failed']}/{r['seeds']}"] for r in rows]))
    print(f"\n{len(jobs)} runs in {time.perf_counter() - start:.0f} s; written to {path.name}")


if __name__ == "__main__":
    main()
