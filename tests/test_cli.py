"""graphnorm's command line: every option, every exit code, refusals, through click's CliRunner and once for
real as a subprocess."""

from __future__ import annotations

import copy
import json
import operator
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import graphnorm
from graphnorm.cli import main
from graphnorm.loading import load_converted
from graphnorm.zoo import DigitsCNN

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
DIGITS = os.path.join(FIXTURES, "digits_cnn.pt")
SAMPLE = os.path.join(FIXTURES, "digits_sample.npy")


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("mode", ["analytic", "reparam", "normprop", "fixed"])
def test_convert_fixture_to_onnx_in_every_mode(mode: str, tmp_path) -> None:
    out = tmp_path / "digits.onnx"
    result = run("convert", DIGITS, out, "--mode", mode)
    assert result.exit_code == 0, result.output
    assert out.exists()
    assert "BatchNorm call sites" in result.output and f"({'2 ' + mode})" in result.output
    assert "verified" in result.output and "batch sizes [2, 3]" in result.output


def test_summary_counts_the_statistics_program(tmp_path) -> None:
    result = run("convert", DIGITS, tmp_path / "a.pt", "--mode", "analytic")
    assert result.exit_code == 0, result.output
    converted = load_converted(str(tmp_path / "a.pt"))
    program = converted.statistics_program.train_program
    ops = sum(node.op in ("call_function", "call_module") and node.target is not operator.getitem
              for node in program.graph.nodes)
    assert ops > 0 and f"{ops} ops per training step" in " ".join(result.output.split())
    fixed = run("convert", DIGITS, tmp_path / "f.pt", "--mode", "fixed")
    assert fixed.exit_code == 0 and "statistics program" not in fixed.output


def test_json_summary_and_quiet(tmp_path) -> None:
    result = run("convert", DIGITS, tmp_path / "a.onnx", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary["conversion"]["counts"] == {"analytic": 2}
    assert summary["export"]["op_counts"]["Conv"] == 2 and "BatchNormalization" not in summary["export"]["op_counts"]
    assert summary["input_shape"] == [1, 1, 8, 8] and summary["notes"] == []
    quiet = run("convert", DIGITS, tmp_path / "b.onnx", "-q")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_refuses_to_overwrite_without_force(tmp_path) -> None:
    out = tmp_path / "x.onnx"
    out.write_bytes(b"keep me")
    result = run("convert", DIGITS, out)
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    assert run("convert", DIGITS, out, "--force").exit_code == 0
    assert out.read_bytes() != b"keep me"


def test_refuses_to_unpickle_without_trust_pickle(tmp_path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(DigitsCNN().eval(), pickled)
    refused = run("convert", pickled, tmp_path / "x.onnx", "--input-shape", "1,1,8,8")
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output and "arbitrary code" in refused.output
    assert not (tmp_path / "x.onnx").exists()
    odd = run("convert", "torch.nn:Softsign", tmp_path / "x.onnx", "--input-shape", "1,4", "--fallback-samples", "7")
    assert odd.exit_code == 2 and "must be even" in odd.output
    trusted = run("convert", pickled, tmp_path / "x.onnx", "--input-shape", "1,1,8,8", "--trust-pickle")
    assert trusted.exit_code == 0, trusted.output
    assert "assumed N(0, 1)" in trusted.output


def test_import_spec_with_weights(tmp_path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(DigitsCNN().state_dict(), weights)
    ok = run("convert", "graphnorm.zoo:DigitsCNN", tmp_path / "a.onnx", "--weights", weights, "--input-shape",
             "1,1,8,8", "--input-mean", "0.3", "--input-std", "0.4")
    assert ok.exit_code == 0, ok.output
    torch.save({"head.weight": torch.zeros(3)}, weights)
    bad = run("convert", "graphnorm.zoo:DigitsCNN", tmp_path / "b.onnx", "--weights", weights, "--input-shape",
              "1,1,8,8")
    assert bad.exit_code == 2 and "does not fit the model" in bad.output


def test_input_data_gives_the_statistics(tmp_path) -> None:
    result = run("convert", DIGITS, tmp_path / "a.onnx", "--input-data", SAMPLE, "--json")
    assert result.exit_code == 0, result.output
    data = np.load(SAMPLE)
    assert json.loads(result.output)["input_mean"][0] == pytest.approx(float(data.mean()), rel=1e-6)
    both = run("convert", DIGITS, tmp_path / "b.onnx", "--input-data", SAMPLE, "--input-mean", "0.1")
    assert both.exit_code == 2 and "not both" in both.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-shape", "1,x,8"], "comma-separated list of sizes"),
        (["--input-shape", "1"], "needs a batch and a channel"),
        (["--input-mean", "0.1,abc"], "comma-separated list of numbers"),
        (["--input-std", "-1"], ">= 0"),
        (["--input-mean", "0.1,0.2", "--input-std", "1,1"], "2 channels but input_shape"),
        (["--mode", "magic"], "Invalid value for '--mode'"),
        (["--stochastic-batch", "2"], "Invalid value for '--stochastic-batch'"),
        (["--input-data", "missing.npy"], "no such file"),
    ],
)
def test_bad_options_are_usage_errors(args, message, tmp_path) -> None:
    result = run("convert", DIGITS, tmp_path / "x.onnx", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    ("model", "output", "message"),
    [
        ("graphnorm.zoo:Missing", "x.onnx", "has no attribute"),
        ("no_such_package.models:net", "x.onnx", "cannot import"),
        ("resnet18", "x.onnx", "not an import spec"),
        (DIGITS, "x.txt", "must end in .onnx or .pt"),
        ("graphnorm.zoo:DigitsCNN", "x.onnx", "--input-shape is required"),
    ],
)
def test_bad_models_and_outputs(model, output, message, tmp_path) -> None:
    result = run("convert", model, tmp_path / output)
    assert result.exit_code == 2 and message in result.output, result.output


def test_failures_exit_1_in_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    # LayerNorm() needs an argument: a usage error.
    assert run("convert", "torch.nn:LayerNorm", tmp_path / "x.onnx", "--input-shape", "1,4").exit_code == 2
    # A model with an op that has no moment rule, with the sampled fallback refused: a conversion failure.
    unsupported = run("convert", "torch.nn:Softsign", tmp_path / "x.onnx", "--input-shape", "1,4", "--strict")
    assert unsupported.exit_code == 1 and "error: no moment rule" in unsupported.output
    assert not (tmp_path / "x.onnx").exists()
    # A wrong ONNX graph: a verification failure.
    from test_export import broken_freeze

    broken_freeze(monkeypatch)
    failing = ["convert", "graphnorm.zoo:DigitsCNN", tmp_path / "y.onnx", "--input-shape", "1,1,8,8"]
    result = run(*failing)
    assert result.exit_code == 1 and "error: onnxruntime differs" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "y.onnx").exists()
    debug = CliRunner().invoke(main, [str(a) for a in [*failing, "--debug"]])
    assert debug.exit_code == 1 and "Traceback" in debug.output


def test_pt_output_rebuilds_the_converted_model(tmp_path) -> None:
    out = tmp_path / "digits_converted.pt"
    result = run("convert", DIGITS, out, "--mode", "reparam", "--stochastic-batch", "16")
    assert result.exit_code == 0, result.output
    rebuilt = load_converted(out).eval()
    original = graphnorm.loading.load_model(DIGITS)
    stats = graphnorm.InputStats(original.defaults["input_mean"], original.defaults["input_std"])
    expected = graphnorm.convert(original.model, stats, input_shape=(1, 1, 8, 8), mode="reparam").eval()
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), expected(x))


def test_options_reach_the_conversion(tmp_path) -> None:
    result = run("convert", DIGITS, tmp_path / "a.onnx", "--leaf-module", "features.0", "--opset", "18",
                 "--no-verify", "--spatial", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["export"]["opset"] == 18 and summary["export"]["diffs"] == []
    legacy = run("convert", DIGITS, tmp_path / "b.onnx", "--legacy-exporter", "--opset", "17")
    assert legacy.exit_code == 0, legacy.output


def test_version_and_help() -> None:
    assert run("--version").output.strip() == f"graphnorm, version {graphnorm.__version__}"
    helptext = run("convert", "--help").output
    for option in ("--mode", "--input-shape", "--input-mean", "--input-std", "--input-data", "--stochastic-batch",
                   "--leaf-module", "--opset", "--verify / --no-verify", "--force", "--json", "--quiet", "--weights",
                   "--trust-pickle", "--debug"):
        assert option in helptext, option


def test_console_script_and_module_run_for_real(tmp_path) -> None:
    scripts = os.path.dirname(sys.executable)
    out = tmp_path / "real.onnx"
    completed = subprocess.run([os.path.join(scripts, "graphnorm"), "convert", DIGITS, str(out), "--json"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["output"] == str(out) and out.exists()
    refused = subprocess.run([os.path.join(scripts, "graphnorm"), "convert", DIGITS, str(out)], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--force" in refused.stderr
    module = subprocess.run([sys.executable, "-m", "graphnorm", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert module.returncode == 0 and graphnorm.__version__ in module.stdout


LABELLED_SAMPLE = os.path.join(FIXTURES, "digits_sample.npz")


def test_readme_command_reports_accuracy_before_and_after_conversion(tmp_path) -> None:
    sample = np.load(LABELLED_SAMPLE)
    x, y = torch.as_tensor(sample["x"]), torch.as_tensor(sample["y"])
    original = graphnorm.loading.load_model(DIGITS).model.eval()
    with torch.no_grad():
        accuracy = (original(x).argmax(1) == y).double().mean().item()
    result = run("convert", DIGITS, tmp_path / "digits.onnx", "--input-data", LABELLED_SAMPLE)
    assert result.exit_code == 0, result.output
    assert f"original {100 * accuracy:.2f}%, converted {100 * accuracy:.2f}%" in result.output
    assert "top-1 100.00%" in result.output and "2 of 2 sites to running statistics" in result.output
    summary = json.loads(run("convert", DIGITS, tmp_path / "d.onnx", "--input-data", LABELLED_SAMPLE,
                             "--json").output)
    agreement = summary["conversion"]["agreement"]
    assert agreement["top1"] == 1.0 and agreement["max_relative_error"] < 1e-4 and agreement["samples"] == 64
    assert agreement["accuracy_original"] == pytest.approx(accuracy) == agreement["accuracy_converted"]
    assert summary["warnings"] == [] and summary["conversion"]["calibration"] == "running"


def test_a_conversion_that_changes_the_function_warns_and_strict_fails_writing_nothing(tmp_path) -> None:
    out = tmp_path / "x.onnx"
    warned = run("convert", DIGITS, out, "--calibrate", "none")
    assert warned.exit_code == 0 and out.exists()
    assert "warning: the converted model does not compute what the original computes" in warned.output
    assert "--calibrate auto" in warned.output
    strict = run("convert", DIGITS, tmp_path / "y.onnx", "--calibrate", "none", "--strict")
    assert strict.exit_code == 1 and "--strict: nothing written" in strict.output
    assert "Traceback" not in strict.output and not (tmp_path / "y.onnx").exists()
    lenient = run("convert", DIGITS, tmp_path / "z.onnx", "--calibrate", "none", "--strict", "--min-agreement", "0",
                  "--max-output-error", "100")
    assert lenient.exit_code == 0 and "warning" not in lenient.output


def test_an_untrained_original_is_no_reference(tmp_path) -> None:
    result = run("convert", "graphnorm.zoo:DigitsCNN", tmp_path / "x.onnx", "--input-shape", "1,1,8,8", "--strict")
    assert result.exit_code == 0, result.output
    assert "no trained running statistics (untrained, or" in result.output and "warning" not in result.output


def test_calibrate_option(tmp_path) -> None:
    missing = run("convert", DIGITS, tmp_path / "x.onnx", "--calibrate", "data")
    assert missing.exit_code == 2 and "--input-data" in missing.output
    measured = run("convert", DIGITS, tmp_path / "x.onnx", "--calibrate", "data", "--input-data", SAMPLE, "--json")
    assert measured.exit_code == 0, measured.output
    summary = json.loads(measured.output)
    conversion = summary["conversion"]
    assert conversion["calibration"] == "data" and summary["warnings"] == []
    assert any("replace the running statistics" in note for note in summary["notes"])
    assert [site["calibration"] for site in conversion["rewritten"]] == ["data", "data"]
    fixed = run("convert", DIGITS, tmp_path / "y.onnx", "--mode", "fixed", "--calibrate", "running")
    assert fixed.exit_code == 1 and "calibrate='data'" in fixed.output


def test_calibrated_pt_output_rebuilds_the_same_function(tmp_path) -> None:
    x = torch.as_tensor(np.load(SAMPLE))
    original = graphnorm.loading.load_model(DIGITS).model.eval()
    for mode in ("analytic", "reparam", "normprop", "fixed"):
        out = tmp_path / f"{mode}.pt"
        spec_and_weights = ["graphnorm.zoo:DigitsCNN", out, "--weights", DIGITS, "--input-shape", "1,1,8,8"]
        assert run("convert", *spec_and_weights, "--mode", mode, "--calibrate",
                   "data" if mode == "fixed" else "auto", "--input-data", SAMPLE).exit_code == 0
        rebuilt = load_converted(out).eval()
        with torch.no_grad():
            reference = copy.deepcopy(original).train()(x) if mode == "fixed" else original(x)
            torch.testing.assert_close(rebuilt(x), reference, rtol=1e-4, atol=1e-4)


def test_an_empty_weights_file_is_one_line_not_a_traceback(tmp_path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    result = run("convert", "graphnorm.zoo:DigitsCNN", tmp_path / "x.onnx", "--input-shape", "1,1,8,8",
                 "--weights", empty)
    assert result.exit_code == 2 and "empty.pt is empty (0 bytes)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.onnx").exists()
