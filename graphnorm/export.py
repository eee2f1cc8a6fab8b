"""ONNX export with onnxruntime verification: :func:`export_onnx`.

The model is frozen first (:mod:`graphnorm.freeze`: normalizations folded into the Linear/Conv layers), then
exported with the torch.onnx exporter (the dynamo exporter by default; ``legacy=True`` for the TorchScript
one) on a sample batch of at least 2, so the batch dim stays dynamic. The weights are stored inside the file.
``onnx.checker.check_model(full_check=True)`` validates it; then onnxruntime runs it on random inputs at two
batch sizes and its outputs are compared with the *given* model's in eval mode, so the freezing is verified
too. An element passes when ``|ort - torch| <= atol + rtol |torch| + 2 r``, where ``r`` is PyTorch's own
float32 rounding error on that output (its largest difference from the same model run in float64): deep
float32 networks differ between two correct implementations by about that much, and a wrong graph by far
more. The file is written to a temporary name next to the target and renamed at the end: a failure never
leaves a partial file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import GraphnormError, first_line
from .freeze import freeze

__all__ = ["ExportError", "ExportResult", "VerificationError", "export_onnx"]


class ExportError(GraphnormError):
    """The exporter or the ONNX checker failed."""


class VerificationError(GraphnormError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance."""

    def __init__(self, diffs: list[dict[str, float]], rtol: float, atol: float):
        self.diffs = diffs
        worst = ", ".join(f"batch {d['batch']} output {d['output']}: max abs {d['max_abs']:.3g}, "
                          f"max rel {d['max_rel']:.3g}" for d in diffs if not d["ok"])
        super().__init__(f"onnxruntime differs from PyTorch beyond rtol={rtol}, atol={atol}: {worst}")


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced and measured."""

    path: Path
    opset: int
    op_counts: dict[str, int]
    diffs: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "opset": self.opset, "op_counts": self.op_counts, "diffs": self.diffs,
                "timings": self.timings}


def _sample(input_shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_shape[1:]), generator=generator)


def _export(frozen: nn.Module, sample: torch.Tensor, path: str, opset: int | None, dynamic_batch: bool,
            legacy: bool) -> None:
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, torch.no_grad():
        if legacy:
            torch.onnx.export(frozen, (sample,), path, dynamo=False, opset_version=opset or 17,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None)
            return
        dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        program = torch.onnx.export(frozen, (sample,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                                    external_data=False, verbose=False)
        program.save(path, external_data=False)


def _outputs(value: Any) -> list[np.ndarray]:
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, (tuple, list)):
        return [array for item in value for array in _outputs(item)]
    if isinstance(value, dict):
        return [array for item in value.values() for array in _outputs(item)]
    raise ExportError(f"cannot compare a model output of type {type(value).__name__}")


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_shape: Iterable[int], dynamic_batch: bool = True,
                opset: int | None = None, verify: bool = True, rtol: float = 1e-4, atol: float = 1e-5,
                legacy: bool = False, leaf_modules: Iterable[type | str] = (),
                concrete_args: dict[str, Any] | None = None) -> ExportResult:
    """Export ``model`` (converted or plain, evaluated in eval mode) to ONNX at ``path`` with no BatchNorm
    left, check it, and verify it with onnxruntime (see the module docstring)."""
    import onnx

    input_shape = tuple(int(s) for s in input_shape)
    target = Path(path)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model.eval()
    frozen = freeze(model, input_shape=input_shape, leaf_modules=leaf_modules, concrete_args=concrete_args)
    timings["freeze_s"] = time.perf_counter() - start
    export_batch = max(2, input_shape[0]) if dynamic_batch else input_shape[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        start = time.perf_counter()
        try:
            _export(frozen, _sample(input_shape, export_batch, 0), temporary, opset, dynamic_batch, legacy)
        except Exception as err:
            raise ExportError(f"torch.onnx export failed: {first_line(err)}") from err
        timings["export_s"] = time.perf_counter() - start
        start = time.perf_counter()
        proto = onnx.load(temporary)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as err:
            raise ExportError(f"onnx.checker rejected the exported model: {first_line(err)}") from err
        timings["check_s"] = time.perf_counter() - start
        op_counts = dict(Counter(node.op_type for node in proto.graph.node))
        if "BatchNormalization" in op_counts:
            raise ExportError("the exported graph still holds BatchNormalization nodes")
        opset_version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        result = ExportResult(target, opset_version, op_counts, timings=timings)
        if verify:
            start = time.perf_counter()
            result.diffs = _verify(model, temporary, input_shape, export_batch, dynamic_batch, rtol, atol)
            timings["verify_s"] = time.perf_counter() - start
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the user's usual mode
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return result


def _verify(model: nn.Module, path: str, input_shape: tuple[int, ...], export_batch: int, dynamic_batch: bool,
            rtol: float, atol: float) -> list[dict[str, Any]]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    batches = [export_batch, export_batch + 1] if dynamic_batch else [export_batch]
    exact = copy.deepcopy(model).double().eval()
    diffs = []
    for seed, batch in enumerate(batches, start=1):
        sample = _sample(input_shape, batch, seed)
        with torch.no_grad():
            expected = _outputs(model(sample))
            reference = _outputs(exact(sample.double()))
        actual = session.run(None, {input_name: sample.numpy()})
        for index, (want, got, truth) in enumerate(zip(expected, actual, reference, strict=True)):
            want64 = want.astype(np.float64)
            gap = np.abs(want64 - got.astype(np.float64))
            # PyTorch's own float32 rounding error on this input, measured against float64: two float32
            # implementations may differ by about twice it, whatever the tolerance asked for.
            rounding = float(np.abs(want64 - truth).max()) if gap.size else 0.0
            max_abs = float(gap.max()) if gap.size else 0.0
            max_rel = float((gap / np.maximum(np.abs(want64), 1e-12)).max()) if gap.size else 0.0
            ok = bool(np.all(gap <= atol + rtol * np.abs(want64) + 2.0 * rounding))
            diffs.append({"batch": batch, "output": index, "max_abs": max_abs, "max_rel": max_rel,
                          "float32_rounding": rounding, "ok": ok})
    if not all(d["ok"] for d in diffs):
        raise VerificationError(diffs, rtol, atol)
    return diffs
