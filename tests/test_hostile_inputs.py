"""Hostile and broken inputs through the CLI: a file never runs code without consent, every failure is one line
with its exit code (2: what the command line names is wrong; 1: the conversion failed), no traceback without
--debug, nothing written and no input changed."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import graphnorm.loading
from graphnorm.cli import main
from graphnorm.zoo import DigitsCNN

FIXTURES = Path(__file__).parent.parent / "fixtures"
DIGITS = FIXTURES / "digits_cnn.pt"
SHAPE = ["--input-shape", "1,1,8,8"]


def digest(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with the hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(tmp_path: Path, *args, exit_code: int = 2, message: str, inputs: tuple[Path, ...] = ()) -> str:
    """Run ``graphnorm convert ARGS`` and check the refusal: exit code, the message on one line starting with
    ``error:``, no traceback, nothing new written in ``tmp_path`` and ``inputs`` byte-identical."""
    before = digest(tmp_path)
    inputs_before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs if p.is_file()}
    result = CliRunner().invoke(main, ["convert", *[str(a) for a in args]])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == exit_code, result.output
    assert lines and lines[0].startswith("error: ") and message in lines[0], result.output
    assert all(not line.startswith("error") for line in lines[1:]) and len(lines) <= 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    assert digest(tmp_path) == before
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs_before} == inputs_before
    return lines[0]


def checkpoint(path: Path, spec: str, state: dict | None = None) -> Path:
    torch.save({"format": "graphnorm-checkpoint/1", "model": spec,
                "state_dict": DigitsCNN().state_dict() if state is None else state, "input_shape": [1, 1, 8, 8]},
               path)
    return path


@pytest.fixture
def side_effect_package(tmp_path, monkeypatch) -> Path:
    """A module on sys.path that writes a marker file when imported (any import is running code)."""
    package = tmp_path / "site"
    package.mkdir()
    marker = tmp_path / "site" / "IMPORTED"
    (package / "sideeffect_models.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from graphnorm.zoo import DigitsCNN as Net\n")
    monkeypatch.syspath_prepend(str(package))
    yield marker
    sys.modules.pop("sideeffect_models", None)


# --- a file must never run code without consent ---------------------------------------------------------------

def test_a_checkpoint_naming_os_abort_is_refused_before_any_import(tmp_path) -> None:
    bad = checkpoint(tmp_path / "ck.pt", "os:abort")
    line = refused(tmp_path, bad, tmp_path / "x.onnx", message="names the model 'os:abort'", inputs=(bad,))
    assert "--trust-code" in line and "--allow-package os" in line


def test_a_module_with_import_side_effects_is_not_imported(tmp_path, side_effect_package) -> None:
    bad = checkpoint(tmp_path / "ck.pt", "sideeffect_models:Net")
    refused(tmp_path, bad, tmp_path / "x.onnx", message="not in an allow-listed package")
    assert not side_effect_package.exists() and "sideeffect_models" not in sys.modules


@pytest.mark.parametrize("spec", ["torchvision.io:write_file", "timm.models:load_checkpoint", "graphnorm.zoo:torch"])
def test_an_allow_listed_package_gives_only_model_classes_and_registered_factories(spec, tmp_path) -> None:
    bad = checkpoint(tmp_path / "ck.pt", spec)
    refused(tmp_path, bad, tmp_path / "x.onnx", message="not an nn.Module class or a registered model factory")


@pytest.mark.parametrize("spec", ["os;rm:x", "os:abort()", "../evil:x", ""])
def test_a_malformed_spec_is_refused(spec, tmp_path) -> None:
    bad = checkpoint(tmp_path / "ck.pt", spec)
    refused(tmp_path, bad, tmp_path / "x.onnx", message="is not an import spec")


def test_consent_opens_each_path(tmp_path, side_effect_package) -> None:
    """--trust-code, --allow-package and the spec typed as MODEL with the checkpoint as --weights each convert;
    a registered factory and a class of an allow-listed package need nothing."""
    ours = checkpoint(tmp_path / "ck.pt", "sideeffect_models:Net")
    for extra in (["--trust-code"], ["--allow-package", "sideeffect_models"]):
        result = CliRunner().invoke(main, ["convert", str(ours), str(tmp_path / "x.pt"), "--force", "-q", *extra])
        assert result.exit_code == 0, result.output
    typed = CliRunner().invoke(main, ["convert", "sideeffect_models:Net", str(tmp_path / "y.pt"), "-q",
                                      "--weights", str(ours)])
    assert typed.exit_code == 0, typed.output
    assert side_effect_package.exists()
    other = checkpoint(tmp_path / "other.pt", "graphnorm.zoo:DigitsCNN")
    refused(tmp_path, "sideeffect_models:Net", tmp_path / "z.pt", "--weights", other,
            message="is a checkpoint of 'graphnorm.zoo:DigitsCNN', not of MODEL")


def test_registered_factories_and_model_classes_need_no_consent(tmp_path) -> None:
    import torchvision

    for spec, kind in (("torchvision.models:resnet18", torchvision.models.ResNet),
                       ("graphnorm.zoo:DigitsCNN", DigitsCNN)):
        path = tmp_path / "ck.pt"
        checkpoint(path, spec, kind().state_dict() if kind is DigitsCNN else torchvision.models.resnet18().state_dict())
        assert isinstance(graphnorm.loading.load_model(str(path)).model, kind)


class _Payload:
    """Unpickling this writes a marker file: what an attacker's pickle would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.bin", "model"])
def test_a_pickle_under_any_suffix_is_not_unpickled(name, tmp_path) -> None:
    marker = tmp_path.parent / f"{tmp_path.name}-UNPICKLED"
    bad = tmp_path / name
    with open(bad, "wb") as f:
        pickle.dump(_Payload(marker), f)
    refused(tmp_path, bad, tmp_path / "x.onnx", *SHAPE, message="holds a pickled Python object", inputs=(bad,))
    torch.save({"w": _Payload(marker)}, bad)
    refused(tmp_path, bad, tmp_path / "x.onnx", *SHAPE, message="holds a pickled Python object", inputs=(bad,))
    refused(tmp_path, "graphnorm.zoo:DigitsCNN", tmp_path / "x.onnx", *SHAPE, "--weights", bad,
            message="--weights takes a state_dict", inputs=(bad,))
    assert not marker.exists()


def test_a_tensor_declaring_more_bytes_than_its_record_is_refused(tmp_path) -> None:
    """A checkpoint whose pickle declares a 1 GiB storage backed by a 4 KB record."""
    small = tmp_path / "small.pt"
    torch.save({"format": "graphnorm-checkpoint/1", "model": "graphnorm.zoo:DigitsCNN",
                "state_dict": {"w": torch.zeros(1000)}}, small)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(small) as source, zipfile.ZipFile(bomb, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(b"M\xe8\x03") == 2  # BININT2 1000: the storage's and the tensor's size
                data = data.replace(b"M\xe8\x03", b"J\x00\x00\x00\x40")
            target.writestr(info, data)
    small.unlink()
    refused(tmp_path, bomb, tmp_path / "x.onnx", message="is not a file torch.load can read", inputs=(bomb,))


def test_an_archive_declaring_more_than_memory_is_refused_before_reading(tmp_path, monkeypatch) -> None:
    """A zip whose entries declare more bytes than the machine has (a zip bomb) is refused from its directory,
    before torch.load reads it (the machine's memory is pretended small)."""
    good = checkpoint(tmp_path / "ck.pt", "graphnorm.zoo:DigitsCNN")
    monkeypatch.setattr(graphnorm.loading, "memory_bytes", lambda: 4096)
    read = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: read.append(a))
    refused(tmp_path, good, tmp_path / "x.onnx", message="more than this machine's memory", inputs=(good,))
    assert not read


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: {**s, "features.0.weight": torch.zeros(3, 3)}, "1 of another shape"),
    (lambda s: {k: v.to(torch.int64) if v.is_floating_point() else v for k, v in s.items()},
     "of another kind of dtype"),
    (lambda s: {k: v for k, v in s.items() if "head" not in k}, "2 missing (head"),
])
def test_a_state_dict_with_the_right_keys_but_wrong_contents(change, message, tmp_path) -> None:
    bad = checkpoint(tmp_path / "ck.pt", "graphnorm.zoo:DigitsCNN", change(DigitsCNN().state_dict()))
    refused(tmp_path, bad, tmp_path / "x.onnx", message=message, inputs=(bad,))


# --- the gallery of broken inputs -----------------------------------------------------------------------------

def _truncated(tmp_path: Path) -> Path:
    data = DIGITS.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.pt", "no such file"),
    (lambda d: (d / "dir.pt").mkdir() or d / "dir.pt", "is a directory"),
    (lambda d: ((d / "empty.pt").write_bytes(b"") and d / "empty.pt") or d / "empty.pt", "is empty (0 bytes)"),
    (_truncated, "truncated, damaged or another format"),
    (lambda d: (d / "text.pt").write_text("hello\n") and d / "text.pt", "not a file torch.load can read"),
])
def test_unreadable_model_files(make, message, tmp_path) -> None:
    model = make(tmp_path)
    refused(tmp_path, model, tmp_path / "x.onnx", *SHAPE, message=message)
    refused(tmp_path, "graphnorm.zoo:DigitsCNN", tmp_path / "x.onnx", *SHAPE, "--weights", model, message=message)


@pytest.mark.parametrize(("args", "exit_code", "message"), [
    (["graphnorm.zoo:NoSuchNet"], 2, "has no attribute"),
    (["no_such_package:Net"], 2, "cannot import"),
    ([DIGITS, "--input-shape", "1,1,8"], 1, "does not run on an input of shape (1, 1, 8)"),
    ([DIGITS, "--input-shape", "1,1,0,8"], 2, "all positive"),
    ([DIGITS, "--input-shape", "1,1,100000,100000"], 2, "more than this machine's"),
    ([DIGITS, "--input-std", "nan"], 2, "NaN or infinite"),
    ([DIGITS, "--input-std", "inf"], 2, "NaN or infinite"),
    ([DIGITS, "--input-std", "-1"], 2, ">= 0"),
    ([DIGITS, "--input-mean", "0,0"], 2, "2 channels but input_shape"),
])
def test_bad_models_shapes_and_statistics(args, exit_code, message, tmp_path) -> None:
    extra = SHAPE if not any(a == "--input-shape" for a in args) and not str(args[0]).endswith(".pt") else []
    refused(tmp_path, args[0], tmp_path / "x.onnx", *args[1:], *extra, exit_code=exit_code, message=message)


@pytest.mark.parametrize(("data", "message"), [
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x), "NaN or infinite"),
    (lambda x: np.repeat(x, 3, axis=1), "3 channels but input_shape"),
])
def test_bad_input_data(data, message, tmp_path) -> None:
    samples = tmp_path / "data.npy"
    np.save(samples, data(np.random.default_rng(0).normal(size=(10, 1, 8, 8)).astype(np.float32)))
    refused(tmp_path, DIGITS, tmp_path / "x.onnx", "--input-data", samples, message=message, inputs=(samples,))


def test_zero_variance_statistics_and_channels_convert_without_nan(tmp_path) -> None:
    result = CliRunner().invoke(main, ["convert", str(DIGITS), str(tmp_path / "x.onnx"), "--input-std", "0", "-q"])
    assert result.exit_code == 0, result.output


def test_a_model_without_batchnorm_is_a_no_op_that_says_so(tmp_path) -> None:
    result = CliRunner().invoke(main, ["convert", "torch.nn:ReLU", str(tmp_path / "x.onnx"), "--input-shape", "1,4"])
    assert result.exit_code == 0 and "MODEL has no BatchNorm: nothing to rewrite" in result.output


def test_an_existing_output_is_untouched_without_force(tmp_path) -> None:
    output = tmp_path / "x.onnx"
    output.write_bytes(b"precious")
    refused(tmp_path, DIGITS, output, message="exists; pass --force", inputs=(output,))


@pytest.mark.parametrize("output", ["x.onnx", "x.pt"])
@pytest.mark.parametrize(("failure", "message"), [
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
])
def test_a_read_only_or_full_output_directory(output, failure, message, tmp_path, monkeypatch) -> None:
    """Writing fails when the file is moved into place (simulated: tests run as root, who writes anywhere):
    exit 1, one line, no partial or temporary file left."""

    def fail(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr(os, "replace", fail)
    line = refused(tmp_path, DIGITS, tmp_path / output, exit_code=1, message=f"cannot write {tmp_path / output}")
    assert message in line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_export_leaves_no_partial_file(signum, tmp_path) -> None:
    """A real process, stopped by a signal while the ONNX file is half made (the exporter is slowed down after
    writing its temporary file): non-zero exit, no output, no temporary file."""
    started = tmp_path / "started"
    script = tmp_path / "slow_export.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even if started in background
        import graphnorm.export as export
        original = export._export
        def slow(*args, **kwargs):
            original(*args, **kwargs)
            open({str(started)!r}, "w").close()
            time.sleep(120)
        export._export = slow
        from graphnorm.cli import main
        main(["convert", {str(DIGITS)!r}, {str(tmp_path / "out" / "x.onnx")!r}, "-q"])
    """))
    (tmp_path / "out").mkdir()
    process = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not started.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0
    assert list((tmp_path / "out").iterdir()) == []


def test_a_batchnorm_without_running_statistics_converts_and_says_why_it_is_no_reference(tmp_path,
                                                                                          monkeypatch) -> None:
    """``track_running_stats=False``: the original normalizes with batch statistics even in eval, so it is no
    reference for agreement; the conversion succeeds and says so (no warning, exit 0)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "nostats_models.py").write_text(
        "import torch.nn as nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = CliRunner().invoke(main, ["convert", "nostats_models:net", str(tmp_path / "x.onnx"), *SHAPE])
    sys.modules.pop("nostats_models", None)
    assert result.exit_code == 0, result.output
    assert "no trained running statistics (untrained, or track_running_stats=False)" in result.output
