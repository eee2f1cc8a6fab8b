"""Loading models, weights, input statistics and graphnorm's own checkpoint files, safely.

A pickled module can run arbitrary code when loaded, so graphnorm unpickles one only when the caller says it
trusts the file (``trust_pickle=True``, the CLI's ``--trust-pickle``); everything else goes through
``torch.load(weights_only=True)``.

graphnorm's checkpoint format (a ``.pt`` file that ``weights_only=True`` loads) is a dict:

``{"format": "graphnorm-checkpoint/1", "model": "<package.module:attr>", "state_dict": {...},
"input_shape": [...], "input_mean": [...], "input_std": [...]}`` for a model to convert (the input entries
are optional), and the same with ``"format": "graphnorm-converted/1"`` plus ``"convert": {keyword arguments
of graphnorm.convert}`` for a converted model (:func:`save_converted`, :func:`load_converted`).
"""

from __future__ import annotations

import importlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import GraphnormError, first_line
from .stats import InputStats

__all__ = ["LoadedModel", "ModelLoadError", "load_converted", "load_input_data", "load_labels", "load_model",
           "save_converted"]

CHECKPOINT = "graphnorm-checkpoint/1"
CONVERTED = "graphnorm-converted/1"


class ModelLoadError(GraphnormError):
    """The model, its weights or its input data could not be loaded as given."""


@dataclass
class LoadedModel:
    model: nn.Module | torch.export.ExportedProgram
    spec: str | None  # import spec, when the model can be rebuilt from code
    defaults: dict[str, Any] = field(default_factory=dict)  # input_shape / input_mean / input_std from a checkpoint


def import_model(spec: str) -> nn.Module:
    """``package.module:attr`` naming an ``nn.Module`` instance, or a zero-argument callable returning one."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelLoadError(f"'{spec}' is not an import spec; write package.module:attr, e.g. "
                             "torchvision.models:resnet18")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelLoadError(f"cannot import '{module_name}' ({err}); is the package installed?") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"'{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if (isinstance(target, type) and issubclass(target, nn.Module)) or not isinstance(target, nn.Module):
        if not callable(target):
            raise ModelLoadError(f"'{spec}' is neither an nn.Module nor a callable returning one")
        try:
            target = target()
        except TypeError as err:
            raise ModelLoadError(f"calling '{spec}' with no arguments failed: {err}") from err
    if not isinstance(target, nn.Module):
        raise ModelLoadError(f"'{spec}' gave a {type(target).__name__}, not an nn.Module")
    return target


def _safe_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ModelLoadError(f"no such file: {path}") from err


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file (``weights_only=True``) into ``model``, strictly."""
    path = Path(path)
    try:
        state = _state_dict_of(_safe_load(path), path)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"{path} is not a weights-only state_dict file: {first_line(err)}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"{path} does not fit the model: {first_line(err)} ...") from err


def is_export_archive(path: Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (a zip holding ``<name>/archive_format``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "archive_format" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_exported_program(path: Path, weights: str | os.PathLike | None, trust_pickle: bool) -> LoadedModel:
    if not trust_pickle:
        raise ModelLoadError(
            f"{path} is a torch.export program (.pt2); torch.export.load can run code stored in such a file (it "
            "unpickles its sample inputs and evaluates its shape expressions). If you trust the file, pass "
            "--trust-pickle; otherwise give the model as an import spec (package.module:attr) with --weights FILE")
    if weights is not None:
        raise ModelLoadError(f"{path} holds its own weights; --weights applies to import specs and checkpoints")
    try:
        program = torch.export.load(path)
    except Exception as err:
        raise ModelLoadError(f"{path} is not a program torch.export.load can read: {first_line(err)}") from err
    return LoadedModel(program, None)


def load_model(source: str, *, weights: str | os.PathLike | None = None, trust_pickle: bool = False) -> LoadedModel:
    """A model from an import spec (optionally with ``weights``), a graphnorm checkpoint, or, only with
    ``trust_pickle``, a pickled module or a ``torch.export`` program (``.pt2``)."""
    path = Path(source)
    if path.suffix in (".pt", ".pth", ".pt2") or path.exists():
        if not path.exists():
            raise ModelLoadError(f"no such file: {path}")
        return _load_file(path, weights, trust_pickle)
    model = import_model(source)
    if weights is not None:
        load_weights(model, weights)
    return LoadedModel(model, source)


def _load_file(path: Path, weights: str | os.PathLike | None, trust_pickle: bool) -> LoadedModel:
    if is_export_archive(path):
        return _load_exported_program(path, weights, trust_pickle)
    try:
        content = _safe_load(path)
    except ModelLoadError:
        raise
    except Exception as err:  # weights_only refused: a pickled object
        if not trust_pickle:
            raise ModelLoadError(
                f"{path} holds a pickled Python object; loading it can run arbitrary code. If you trust the file, "
                "pass --trust-pickle; otherwise give the model as an import spec (package.module:attr) with "
                "--weights FILE holding its state_dict") from err
        content = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(content, nn.Module):
        if weights is not None:
            load_weights(content, weights)
        return LoadedModel(content, None)
    if isinstance(content, dict) and content.get("format") in (CHECKPOINT, CONVERTED):
        if content["format"] == CONVERTED:
            raise ModelLoadError(f"{path} holds a converted model already; convert the original model")
        model = import_model(content["model"])
        model.load_state_dict(_state_dict_of(content, path), strict=True)
        if weights is not None:
            load_weights(model, weights)
        defaults = {key: content[key] for key in ("input_shape", "input_mean", "input_std") if key in content}
        return LoadedModel(model, content["model"], defaults)
    raise ModelLoadError(f"{path} holds a state_dict without a model; give the model as an import spec "
                         "(package.module:attr) and this file with --weights")


def load_input_data(path: str | os.PathLike) -> torch.Tensor:
    """Samples ``[N, C, ...]`` from ``.npy``, ``.npz`` (first array, or ``x``) or ``.pt`` (a tensor)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"no such file: {path}")
    try:
        if path.suffix == ".npy":
            return torch.as_tensor(np.load(path, allow_pickle=False))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                key = "x" if "x" in arrays.files else arrays.files[0]
                return torch.as_tensor(arrays[key])
        if path.suffix in (".pt", ".pth"):
            value = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(value, torch.Tensor):
                return value
            raise ModelLoadError(f"{path} does not hold a single tensor")
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"cannot read {path}: {first_line(err)}") from err
    raise ModelLoadError(f"{path}: input data must be .npy, .npz or .pt")


def load_labels(path: str | os.PathLike) -> torch.Tensor | None:
    """Integer class labels ``[N]`` stored beside the samples: the ``y`` (or ``labels``) array of an ``.npz``;
    None for other files or an ``.npz`` without one."""
    path = Path(path)
    if path.suffix != ".npz":
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            key = next((k for k in ("y", "labels") if k in arrays.files), None)
            if key is None:
                return None
            labels = torch.as_tensor(arrays[key])
    except Exception as err:
        raise ModelLoadError(f"cannot read {path}: {first_line(err)}") from err
    if labels.dim() != 1 or labels.is_floating_point():
        raise ModelLoadError(f"{path}: '{key}' must be a 1-D array of integer class labels, got "
                             f"{tuple(labels.shape)} {labels.dtype}")
    return labels


def save_converted(path: str | os.PathLike, converted: nn.Module, *, spec: str, convert_kwargs: dict[str, Any],
                   stats: InputStats) -> None:
    """Write a converted model as its import spec, conversion arguments and state_dict (atomically)."""
    path = Path(path)
    payload = {"format": CONVERTED, "model": spec, "convert": convert_kwargs,
               "input_mean": stats.mean.tolist(), "input_std": stats.std.tolist(),
               "state_dict": {k: v.detach().clone() for k, v in converted.state_dict().items()}}
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def load_converted(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save_converted` (no unpickling of code)."""
    from .rewrite import convert

    path = Path(path)
    content = _safe_load(path)
    if not isinstance(content, dict) or content.get("format") != CONVERTED:
        raise ModelLoadError(f"{path} is not a graphnorm converted-model file")
    stats = InputStats(content["input_mean"], content["input_std"])
    converted = convert(import_model(content["model"]), stats, **{**content["convert"], "agreement_samples": 0})
    converted.load_state_dict(content["state_dict"], strict=True)
    return converted
