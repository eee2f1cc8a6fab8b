"""The model zoo: one small model per timm family with BatchNorm and torchvision's BatchNorm classifiers and
segmentation models, at their own input sizes, through graphnorm: convert (analytic, and fixed), a finite
forward, closed-form coverage (``fallback="error"``), ONNX export verified with onnxruntime, and the analytic
std error at the BatchNorm inputs on N(0, 1) input. Writes benchmarks/results/zoo.json and docs/models.md.

    python benchmarks/zoo.py                      # every family; about 1-2 hours on 2 cores
    python benchmarks/zoo.py --models timm:efficientnet_b0,torchvision:shufflenet_v2_x0_5

Families are found, not hand-kept: every timm model name is built on the meta device (no memory, no
weights), grouped by its architecture (the name's leading letters, ``tf_``/``legacy_``/``gluon_`` kept apart
as their own variants), and the family's smallest model with a BatchNorm is taken. Each model runs in its own
process with a time limit, so one crash or hang is one failed row.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from common import machine, markdown_table, write_result

from graphnorm.errors import first_line
from graphnorm.graphs import has_batchnorm

ROOT = Path(__file__).resolve().parents[1]
SEGMENTATION_SHAPE = (1, 3, 224, 224)


def _family(name: str) -> str | None:
    if name.startswith("test_"):
        return None
    prefix = ""
    for variant in ("tf_", "legacy_", "gluon_"):
        if name.startswith(variant):
            prefix, name = variant, name[len(variant):]
    match = re.match(r"[a-z]+", name)
    return prefix + match.group(0) if match else None


def _smallest_per_family(names: list[str], build) -> dict[str, tuple[str, int]]:
    best: dict[str, tuple[str, int]] = {}
    for name in names:
        family = _family(name)
        if family is None:
            continue
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build(name)
        except Exception:
            continue
        if not has_batchnorm(model):
            continue
        size = sum(p.numel() for p in model.parameters())
        if family not in best or size < best[family][1]:
            best[family] = (name, size)
    return best


def discover() -> list[str]:
    """``source:name`` of the zoo's models (timm families, torchvision classification and segmentation)."""
    import timm
    import torchvision

    timm_best = _smallest_per_family(timm.list_models(), lambda n: timm.create_model(n, pretrained=False))
    classification = torchvision.models.list_models(module=torchvision.models)
    vision_best = _smallest_per_family(classification, lambda n: torchvision.models.get_model(n, weights=None))
    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    seg_best = _smallest_per_family(segmentation, lambda n: torchvision.models.get_model(
        n, weights=None, weights_backbone=None))
    return ([f"timm:{name}" for name, _ in sorted(timm_best.values())]
            + [f"torchvision:{name}" for name, _ in sorted(vision_best.values())]
            + [f"segmentation:{name}" for name, _ in sorted(seg_best.values())])


def build(entry: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The model of a zoo entry with random weights, in eval, and the input shape it is run at."""
    source, name = entry.split(":", 1)
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        return model.eval(), (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    import torchvision

    if source == "segmentation":
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False)
        return _OutTensor(model).eval(), SEGMENTATION_SHAPE
    model = torchvision.models.get_model(name, weights=None)
    size = 299 if name.startswith("inception") else 224
    return model.eval(), (1, 3, size, size)


class _OutTensor(torch.nn.Module):
    """torchvision's segmentation models return ``{"out": logits}``; the zoo converts and exports the logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _step(row: dict, name: str, fn):
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as err:
        row[name] = "fail"
        reason = first_line(err)
        row.setdefault("errors", {})[name] = reason if reason == type(err).__name__ else \
            f"{type(err).__name__}: {reason[:300]}"
        return None
    finally:
        row.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
    row[name] = "ok"
    return value


def run_one(entry: str) -> dict:
    """Every check of one zoo entry (in this process)."""
    import tempfile

    import graphnorm

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    row: dict = {"model": entry}
    built = _step(row, "build", lambda: build(entry))
    if built is None:
        return row
    model, shape = built
    row["input_shape"] = list(shape)
    row["batchnorms"] = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    stats = graphnorm.InputStats.standard(shape[1])
    converted = _step(row, "convert", lambda: graphnorm.convert(model, stats, input_shape=shape,
                                                                agreement_samples=0))
    if converted is not None:
        log = converted.graphnorm_log
        row.update(capture=log.capture, specialized=len(log.specialized), rewritten=len(log.rewritten),
                   sampled=sorted({node.target for node in log.sampled}), sampled_nodes=len(log.sampled))
        output = _step(row, "forward", lambda: converted(torch.randn(shape)))
        if output is not None and not bool(torch.isfinite(output).all()):
            row["forward"] = "not finite"

    _step(row, "closed_form", lambda: graphnorm.propagate(model, stats, shape, batch_norm="analytic",
                                                          fallback="error"))
    _step(row, "fixed", lambda: graphnorm.convert(model, stats, input_shape=shape, mode="fixed",
                                                  agreement_samples=0))
    if converted is not None:
        with tempfile.TemporaryDirectory() as folder:
            _step(row, "export", lambda: graphnorm.export_onnx(converted, Path(folder) / "model.onnx",
                                                               input_shape=shape))
        report = _step(row, "inspect", lambda: graphnorm.inspect(model, stats, input_shape=shape, samples=32,
                                                                 batch_size=8, normalize="analytic", progress=False))
        if report is not None:
            summary = report.summary
            row["std_error_median"], row["std_error_worst"] = summary["std_error_median"], summary["std_error_worst"]
    return row


def _run_isolated(entry: str, timeout: float) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--one", entry], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": entry, "build": "timeout", "errors": {"process": f"over {timeout:.0f} s"}}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"model": entry, "build": "crash", "errors": {"process": f"exit {done.returncode}: {tail}"}}
    return json.loads(lines[-1])


def _converts_and_exports(row: dict) -> bool:
    return all(row.get(step) == "ok" for step in ("convert", "forward", "export"))


def write_page(rows: list[dict], command: str, planned: int) -> None:
    total = len(rows)
    full = sum(_converts_and_exports(r) for r in rows)
    closed = sum(_converts_and_exports(r) and r.get("closed_form") == "ok" for r in rows)
    lines = [
        "# Models",
        "",
        "Generated by `benchmarks/zoo.py` (do not edit by hand): one small model per timm family with BatchNorm",
        "and torchvision's BatchNorm classification and segmentation models, random weights, at their own input",
        "sizes (segmentation models at 224x224, their `out` logits).",
        "",
        f"Command: `{command}`. Machine: {machine()['cpu']}, torch {torch.__version__}.",
        "",
        f"**{full} of {total}** convert (analytic mode), run finite and export to ONNX verified with onnxruntime; "
        f"**{closed} of {total}** of them with closed-form rules only (`fallback=\"error\"`).",
        "",
        *([f"Partial run: {total} of the {planned} models planned have results so far.", ""]
          if total < planned else []),
        "Columns: *capture* is how the graph was traced (`symbolic`, `symbolic with shapes` where Python "
        "branched on shapes, or `torch.export` where symbolic tracing failed); *sampled* lists the ops whose "
        "moments come from the sampled fallback; *std err* is "
        "the median / worst relative error of the analytic std at the BatchNorm inputs (N(0, 1) input, every "
        "BatchNorm on analytic statistics, 32 samples measured).",
        "",
    ]
    table = []
    for r in rows:
        status = "ok" if _converts_and_exports(r) else next(
            (f"{step}: {r['errors'][step]}" for step in ("build", "process", "convert", "forward", "export")
             if step in r.get("errors", {})), "failed")
        error = ("-" if r.get("std_error_median") is None
                 else f"{r['std_error_median']:.3f} / {r['std_error_worst']:.3f}")
        table.append([f"`{r['model']}`", "x".join(str(s) for s in r.get("input_shape", [])[2:]) or "-",
                      status.replace("|", "/")[:160], r.get("closed_form", "-"), r.get("capture", "-"),
                      ", ".join(r.get("sampled", [])) or "-", error])
    lines.append(markdown_table(["model", "input", "status", "closed form", "capture", "sampled", "std err"], table))
    (ROOT / "docs" / "models.md").write_text("\n".join(lines) + "\n")


def _previous_rows(entries: list[str]) -> dict[str, dict]:
    """Rows of the last run (benchmarks/results/zoo.json) for the planned ``entries``: a long run resumes."""
    path = ROOT / "benchmarks" / "results" / "zoo.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    return {row["model"]: row for row in rows if row.get("model") in entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--models", help="comma-separated source:name entries instead of discovering them")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of benchmarks/results/zoo.json for planned models and run the rest")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    entries = args.models.split(",") if args.models else discover()
    print(f"{len(entries)} models", flush=True)
    done = _previous_rows(entries) if args.resume else {}
    rows = [done[entry] for entry in entries if entry in done]
    for entry in [e for e in entries if e not in done]:
        row = _run_isolated(entry, args.timeout)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("model", "convert", "forward", "export", "closed_form",
                                                   "sampled", "errors")}), flush=True)
        command = " ".join(["python benchmarks/zoo.py", *sys.argv[1:]])
        write_result("zoo", {"command": command, "models": len(entries), "rows": rows})
        write_page(rows, command, len(entries))


if __name__ == "__main__":
    main()
