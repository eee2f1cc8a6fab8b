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

import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import ModelLoadError, first_line
from .stats import InputStats
from .trust import CodeTrust, resolve_attribute, split_spec

__all__ = ["LoadedModel", "ModelLoadError", "load_converted", "load_input_data", "load_labels", "load_model",
           "save_converted"]

CHECKPOINT = "graphnorm-checkpoint/1"
CONVERTED = "graphnorm-converted/1"


@dataclass
class LoadedModel:
    model: nn.Module | torch.export.ExportedProgram
    spec: str | None  # import spec, when the model can be rebuilt from code
    defaults: dict[str, Any] = field(default_factory=dict)  # input_shape / input_mean / input_std from a checkpoint


def instantiate(target: Any, spec: str) -> nn.Module:
    """An ``nn.Module`` instance as is; a class or zero-argument factory called once."""
    if (isinstance(target, type) and issubclass(target, nn.Module)) or not isinstance(target, nn.Module):
        if not callable(target):
            raise ModelLoadError(f"'{spec}' is neither an nn.Module nor a callable returning one")
        try:
            target = target()
        except TypeError as err:
            raise ModelLoadError(f"calling '{spec}' with no arguments failed: {first_line(err)}") from err
    if not isinstance(target, nn.Module):
        raise ModelLoadError(f"'{spec}' gave a {type(target).__name__}, not an nn.Module")
    return target


def import_model(spec: str) -> nn.Module:
    """``package.module:attr`` naming an ``nn.Module`` instance, or a zero-argument callable returning one. For
    a spec the user gave; a spec read from a file goes through :func:`import_named_model`."""
    return instantiate(resolve_attribute(*split_spec(spec), spec), spec)


def import_named_model(spec: Any, where: str, trust: CodeTrust) -> nn.Module:
    """The model a file (``where``) names, imported and called only with the user's consent (:mod:`.trust`):
    the package is checked before the import, the attribute before the call."""
    if not isinstance(spec, str):
        raise ModelLoadError(f"{where}: 'model' must be an import spec string, got {type(spec).__name__}")
    package = trust.check_before_import(spec, where)
    target = resolve_attribute(*split_spec(spec), spec)
    trust.check_after_import(spec, target, package, where)
    return instantiate(target, spec)


class _PickledObject(ModelLoadError):
    """``weights_only`` refused the file: it holds pickled Python objects (classes, functions)."""


def readable_file(path: Path) -> Path:
    """``path`` if it is a non-empty regular file; else a one-line error saying which it is not."""
    if not path.exists():
        raise ModelLoadError(f"no such file: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; give a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); was it written completely?")
    return path


def memory_bytes() -> int:
    """Physical memory of this machine (the ceiling for what a file may make graphnorm allocate)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_declared_size(path: Path) -> None:
    """A zip archive (torch.save's format) declares its entries' sizes; refuse, before reading, one that
    declares more than this machine's memory (a zip bomb or a hostile tensor size)."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return
    if declared > memory_bytes():
        raise ModelLoadError(f"{path} declares {declared / 2**30:.1f} GiB of data, more than this machine's memory "
                             f"({memory_bytes() / 2**30:.1f} GiB); refusing to load it")


def _safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with a one-line error for each way a file can be unreadable."""
    _check_declared_size(readable_file(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            raise _PickledObject(f"{path} holds a pickled Python object; loading it can run arbitrary code") from err
        raise ModelLoadError(f"{path} is damaged: {first_line(err)}") from err
    except Exception as err:
        raise ModelLoadError(f"{path} is not a file torch.load can read (truncated, damaged or another format: "
                             f"{first_line(err)})") from err


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def _listing(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` strictly, after checking every key, shape and kind of dtype (a float
    tensor for a float parameter, an integer one for an integer buffer), all mismatches in one line."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if shapes:
        problems.append(f"{len(shapes)} of another shape (file vs model: {_listing(shapes)})")
    kinds = [f"{k} {state[k].dtype} vs {v.dtype}" for k, v in expected.items()
             if k in state and (state[k].is_floating_point(), state[k].is_complex())
             != (v.is_floating_point(), v.is_complex())]
    if kinds:
        problems.append(f"{len(kinds)} of another kind of dtype ({_listing(kinds)})")
    if problems:
        raise ModelLoadError(f"{path} does not fit the model: {'; '.join(problems)}; was it saved from another "
                             "architecture or configuration?")
    model.load_state_dict(state, strict=True)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A weights file's state_dict, and the whole content when it is a graphnorm checkpoint."""
    try:
        content = _safe_load(path)
    except _PickledObject as err:
        raise ModelLoadError(f"{err}; --weights takes a state_dict saved with torch.save(model.state_dict(), ...)"
                             ) from err
    checkpoint = content if isinstance(content, dict) and content.get("format") == CHECKPOINT else None
    return _state_dict_of(content, path), checkpoint


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file (``weights_only=True``) into ``model``, strictly."""
    path = Path(path)
    fit_state_dict(model, _read_weights(path)[0], path)


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


_INPUT_DEFAULTS = ("input_shape", "input_mean", "input_std")


def load_model(source: str, *, weights: str | os.PathLike | None = None, trust_pickle: bool = False,
               trust_code: bool = False, trusted_packages: Sequence[str] = ()) -> LoadedModel:
    """A model from an import spec (optionally with ``weights``), a graphnorm checkpoint, or, only with
    ``trust_pickle``, a pickled module or a ``torch.export`` program (``.pt2``).

    The import spec a checkpoint names is imported only with consent (:mod:`graphnorm.trust`): ``trust_code``,
    the same spec given as ``source`` with the checkpoint as ``weights``, or a model class/registered factory of
    an allow-listed package (torchvision, timm, graphnorm.zoo and ``trusted_packages``)."""
    trust = CodeTrust(trust_code=trust_code).with_packages(trusted_packages)
    path = Path(source)
    if path.suffix in (".pt", ".pth", ".pt2", ".bin") or path.exists():
        return _load_file(readable_file(path), weights, trust_pickle, trust)
    model = import_model(source)
    defaults: dict[str, Any] = {}
    if weights is not None:
        weights = Path(weights)
        state, checkpoint = _read_weights(weights)
        if checkpoint is not None:
            if checkpoint.get("model") != source:
                raise ModelLoadError(f"{weights} is a checkpoint of '{checkpoint.get('model')}', not of MODEL "
                                     f"'{source}'; give the matching import spec, or the checkpoint alone as MODEL")
            defaults = {key: checkpoint[key] for key in _INPUT_DEFAULTS if key in checkpoint}
        fit_state_dict(model, state, weights)
    return LoadedModel(model, source, defaults)


def _load_file(path: Path, weights: str | os.PathLike | None, trust_pickle: bool, trust: CodeTrust) -> LoadedModel:
    if is_export_archive(path):
        return _load_exported_program(path, weights, trust_pickle)
    try:
        content = _safe_load(path)
    except _PickledObject as err:
        if not trust_pickle:
            raise ModelLoadError(
                f"{err}. If you trust the file, pass --trust-pickle; otherwise give the model as an import spec "
                "(package.module:attr) with --weights FILE holding its state_dict") from err
        content = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(content, nn.Module):
        if weights is not None:
            load_weights(content, weights)
        return LoadedModel(content, None)
    if isinstance(content, dict) and content.get("format") in (CHECKPOINT, CONVERTED):
        if content["format"] == CONVERTED:
            raise ModelLoadError(f"{path} holds a converted model already; convert the original model")
        model = import_named_model(content.get("model"), str(path), trust)
        fit_state_dict(model, _state_dict_of(content, path), path)
        if weights is not None:
            load_weights(model, weights)
        defaults = {key: content[key] for key in _INPUT_DEFAULTS if key in content}
        return LoadedModel(model, content["model"], defaults)
    raise ModelLoadError(f"{path} holds a state_dict without a model; give the model as an import spec "
                         "(package.module:attr) and this file with --weights")


def load_input_data(path: str | os.PathLike) -> torch.Tensor:
    """Samples ``[N, C, ...]`` from ``.npy``, ``.npz`` (first array, or ``x``) or ``.pt`` (a tensor)."""
    path = readable_file(Path(path))
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


def load_converted(path: str | os.PathLike, *, trust_code: bool = False, trusted_packages: Sequence[str] = ()
                   ) -> nn.Module:
    """Rebuild a model written by :func:`save_converted` (no unpickling; the model spec it names is imported
    with the same consent rules as a checkpoint's, see :func:`load_model`)."""
    from .rewrite import convert

    path = Path(path)
    content = _safe_load(path)
    if not isinstance(content, dict) or content.get("format") != CONVERTED:
        raise ModelLoadError(f"{path} is not a graphnorm converted-model file")
    stats = InputStats(content["input_mean"], content["input_std"])
    model = import_named_model(content.get("model"), str(path), CodeTrust(trust_code).with_packages(trusted_packages))
    converted = convert(model, stats, **{**content["convert"], "agreement_samples": 0})
    converted.load_state_dict(content["state_dict"], strict=True)
    return converted
