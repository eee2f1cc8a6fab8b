"""The ``graphnorm`` command line: thin click commands over the library.

Exit codes: 0 success; 1 conversion, export or verification failure; 2 usage error (bad options, a model or
file that cannot be loaded as given). Errors are one or two lines; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table

from . import __version__
from .calibration import CALIBRATIONS
from .errors import GraphnormError, first_line
from .loading import LoadedModel, ModelLoadError, load_input_data, load_labels, load_model, memory_bytes, save_converted
from .sampling import DEFAULT_SAMPLES, FALLBACKS
from .stats import InputStats

MODES = ("analytic", "reparam", "normprop", "fixed")


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise InputError(f"'{text}' is not a comma-separated list of numbers", param_hint=name) from err


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise InputError(f"'{text}' is not a comma-separated list of sizes, e.g. 1,3,224,224",
                         param_hint="--input-shape") from err
    if len(shape) < 2 or any(size < 1 for size in shape):
        raise InputError(f"'{text}' needs a batch and a channel size, all positive, e.g. 1,3,224,224",
                         param_hint="--input-shape")
    # The conversion holds a few batches of this shape and the activations they produce at once.
    needed = math.prod(shape[1:]) * 4 * max(shape[0], 16) * 8
    if needed > memory_bytes():
        raise InputError(f"an input of shape {text} needs about {needed / 2**30:.0f} GiB to convert and check (16 "
                         f"samples and their activations), more than this machine's {memory_bytes() / 2**30:.0f} "
                         "GiB; give the shape of one realistic batch", param_hint="--input-shape")
    return shape


class InputError(click.UsageError):
    """A usage error about MODEL, OUTPUT or an input file: exit code 2, shown as one line ``error: ...`` (no
    usage banner: the command line parsed, what it names is wrong)."""

    def __init__(self, message: str, param_hint: str | None = None):
        super().__init__(f"{param_hint}: {message}" if param_hint else message)

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file or sys.stderr, err=True)


def _usage(error: GraphnormError | str) -> click.UsageError:
    return InputError(error if isinstance(error, str) else first_line(error))


class _Run:
    """Shared state of one command: console output, quiet/json/debug flags, progress."""

    def __init__(self, quiet: bool, as_json: bool, debug: bool):
        self.quiet, self.as_json, self.debug = quiet, as_json, debug
        # Off a terminal (a pipe, a file, a pager) there is no width to fit: tables take their natural width, so
        # that no number is cut to "0.1…".
        self.out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)
        self.err = Console(stderr=True, highlight=False)
        self.notes: list[str] = []

    def step(self, message: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` under a spinner on stderr (shown only on a terminal, and not when quiet)."""
        if self.quiet or not self.err.is_terminal:
            return fn()
        with self.err.status(message):
            return fn()


def _resolve_stats(loaded: LoadedModel, shape: tuple[int, ...], mean: list[float] | None, std: list[float] | None,
                   data: str | None, run: _Run, structure: dict[str, Any]) -> InputStats:
    auto = structure["auto"]
    if data is None and not auto and (structure["per_position"] or structure["patch_covariance"] is not None):
        raise InputError("--per-position and --patch-covariance describe --input-data FILE; give it")
    if data is not None:
        if mean is not None or std is not None:
            raise InputError("give either --input-data or --input-mean/--input-std, not both")
        try:
            samples = load_input_data(data)
            options = {"per_position": structure["per_position"], "patch_covariance": structure["patch_covariance"]}
            if auto and (samples.dim() < 3 or tuple(samples.shape[2:]) != tuple(shape[2:])
                         or min(samples.shape[2:]) < DEFAULT_PATCH_COVARIANCE):
                run.notes.append(f"input statistics from --input-data per channel: its samples are not maps of the "
                                 f"input's size {tuple(shape[2:])}")
                options = {"per_position": False, "patch_covariance": None}
            elif auto:
                run.notes.append(f"input statistics from --input-data per position with the "
                                 f"{DEFAULT_PATCH_COVARIANCE}x{DEFAULT_PATCH_COVARIANCE} patch correlation "
                                 "(--per-channel-input for one mean and variance per channel)")
            stats = InputStats.from_data(samples, **options)
            stats.validate_for(shape)
        except GraphnormError as err:
            raise _usage(f"--input-data {data}: {first_line(err)}") from err
        return stats
    mean = mean if mean is not None else loaded.defaults.get("input_mean")
    std = std if std is not None else loaded.defaults.get("input_std")
    if mean is None and std is None:
        run.notes.append("no input statistics given: assumed N(0, 1) in every channel")
        return InputStats.standard(shape[1])
    try:
        stats = InputStats(mean if mean is not None else 0.0, std if std is not None else 1.0)
        stats.validate_for(shape)
    except GraphnormError as err:
        raise _usage(err) from err
    return stats


def _summary_table(log: Any, export: Any, seconds: float, output: Path, data_source: str | None) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    counts = ", ".join(f"{n} {form}" for form, n in log.counts.items()) or "none"
    table.add_row("BatchNorm call sites", f"{len(log.rewritten)} rewritten ({counts}), {len(log.skipped)} skipped")
    for skip in log.skipped:
        table.add_row("  skipped", f"{skip.node}: {skip.reason}")
    for rewrite in log.rewritten:
        if rewrite.detail.startswith("fallback"):
            table.add_row("  fallback", f"{rewrite.node} -> {rewrite.form} ({rewrite.detail})")
    if log.capture != "symbolic":
        table.add_row("captured", f"{log.capture}; specialized to the input shape at "
                                  f"{len(log.specialized)} place(s)")
        for where in log.specialized:
            table.add_row("  specialized", where)
    if log.sampled:
        table.add_row("sampled ops", f"{len(log.sampled)} without a closed-form rule, moments from "
                                     f"{log.fallback_samples} samples (--fallback error refuses them)")
        for node in log.sampled:
            table.add_row("  sampled", node.describe())
    if log.calibration == "none":
        table.add_row("calibration", "none (the analytic statistics as they are)")
    else:
        table.add_row("calibration", f"{log.calibrated} of {len(log.rewritten)} sites to {log.calibration} statistics")
    if log.statistics is not None:
        table.add_row("statistics program", str(log.statistics).removeprefix("statistics program: "))
    agreement = log.agreement
    if agreement is not None:
        source = data_source if agreement.source == "data" and data_source else agreement.source
        top1 = f"top-1 {100 * agreement.top1:.2f}%, " if agreement.top1 is not None else ""
        table.add_row("agreement with original",
                      f"{top1}relative output error median {agreement.median_relative_error:.2g}, max "
                      f"{agreement.max_relative_error:.2g} (eval, {agreement.samples} samples from {source})")
        if agreement.accuracy_original is not None and agreement.accuracy_converted is not None:
            table.add_row("accuracy", f"original {100 * agreement.accuracy_original:.2f}%, converted "
                                      f"{100 * agreement.accuracy_converted:.2f}% (labels of {source})")
    if export is not None:
        table.add_row("ONNX ops", ", ".join(f"{op} {n}" for op, n in sorted(export.op_counts.items())))
        table.add_row("ONNX opset", str(export.opset))
        if export.diffs:
            worst = max(export.diffs, key=lambda d: d["max_abs"])
            batches = sorted({d["batch"] for d in export.diffs})
            worst_rel = max(d["max_rel"] for d in export.diffs)
            table.add_row("verified", f"onnxruntime vs converted PyTorch at batch sizes {batches}: max abs diff "
                                      f"{worst['max_abs']:.2e}, max rel diff {worst_rel:.2e}")
        else:
            table.add_row("verified", "no (--no-verify)")
    table.add_row("written", str(output))
    table.add_row("time", f"{seconds:.1f} s")
    return table


def _agreement_warnings(log: Any, min_agreement: float, max_output_error: float) -> tuple[list[str], list[str]]:
    """(problems that --strict turns into a failure, notes) about how the converted model agrees with the
    original. Only an original with trained running statistics is a reference worth meeting."""
    agreement = log.agreement
    if agreement is None:
        return [], []
    problems = agreement.problems(min_agreement, max_output_error)
    if not problems:
        return [], []
    if not log.trained_sites:
        return [], ["the original's BatchNorms have no trained running statistics (untrained, or "
                    "track_running_stats=False), so it is no reference: the "
                    f"disagreement ({'; '.join(problems)}) is expected"]
    if log.calibration == "data":
        return [], ["the statistics measured on the data replace the running statistics, as --calibrate data asks: "
                    f"{'; '.join(problems)}"]
    hint = ("calibrate to the running statistics (--calibrate auto or running)" if log.calibration == "none"
            else "check the input statistics and --calibrate")
    return [f"the converted model does not compute what the original computes: {'; '.join(problems)}; {hint}"], []


def _even(_context: click.Context, _parameter: click.Parameter, value: int) -> int:
    if value % 2:
        raise click.BadParameter(f"must be even (the draws come in antithetic pairs), got {value}")
    return value


def _model_input_options(command: Callable) -> Callable:
    """Options shared by the commands that load a model and its input statistics."""
    options = [
        click.option("--input-shape",
                     help="Shape of one input batch, e.g. 1,3,224,224 (default: from a graphnorm checkpoint)."),
        click.option("--input-mean", help="Per-channel input mean, comma-separated."),
        click.option("--input-std", help="Per-channel input std, comma-separated."),
        click.option("--input-data", type=click.Path(),
                     help="Samples (.npy/.npz/.pt) to compute input statistics from (convert: also to check "
                          "agreement with the original, with the labels of an .npz's 'y' array)."),
        click.option("--weights", type=click.Path(),
                     help="state_dict file for an import-spec MODEL (loaded weights-only)."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow MODEL to be a pickled module or a torch.export .pt2 file (both can run code)."),
        click.option("--trust-code", is_flag=True,
                     help="Allow a checkpoint MODEL to import and call the model spec it names, whatever its "
                          "package (default: only model classes and registered factories of allow-listed "
                          "packages; docs/cli.md)."),
        click.option("--allow-package", "allowed_packages", multiple=True, metavar="PACKAGE",
                     help="Add a package to the allow-list for model specs named by checkpoints (repeatable; "
                          "torchvision, timm and graphnorm.zoo are always allowed)."),
        click.option("--leaf-module", "leaf_modules", multiple=True,
                     help="Module path to keep as one call when tracing (repeatable)."),
        click.option("--spatial/--per-channel", default=None,
                     help="Propagate per unit (exact zero padding) or per channel. Default: per unit for inputs "
                          "whose smallest side is <= 128 or with --per-position (convert: in fixed mode only)."),
        click.option("--per-position/--per-channel-input", default=None,
                     help="With --input-data: input mean and variance per position, or one per channel. Default: "
                          "inspect and fixed mode per position with the 3x3 patch correlation (when the data "
                          "has the input's size), the other convert modes per channel."),
        click.option("--patch-covariance", type=click.IntRange(min=1), metavar="K",
                     help="With --input-data: also the input correlation within K-wide patches, used by the "
                          "layers that read the input."),
        click.option("--accuracy", type=click.Choice(["fast", "accurate"]),
                     help="accurate: carry third cumulants and correct activations for skewed inputs (default "
                          "for inspect and fixed mode); fast: Gaussian inputs everywhere (the trainable modes)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random initialization of an import-spec MODEL and of drawn samples."),
        click.option("--fallback", type=click.Choice(FALLBACKS), default="sample", show_default=True,
                     help="Ops without a closed-form moment rule: estimate their moments from Gaussian samples, "
                          "or fail listing them all (convert's --strict implies error)."),
        click.option("--fallback-samples", type=click.IntRange(min=2), default=DEFAULT_SAMPLES, show_default=True,
                     callback=_even, help="Samples K of the sampled fallback (even)."),
        click.option("--debug", is_flag=True, help="Show the Python traceback of errors."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _consent(trust_pickle: bool, trust_code: bool, allowed_packages: tuple[str, ...]) -> dict[str, Any]:
    """The loading consent the command line gives, as :func:`graphnorm.loading.load_model` keywords."""
    return {"trust_pickle": trust_pickle, "trust_code": trust_code, "trusted_packages": allowed_packages}


DEFAULT_PATCH_COVARIANCE = 3
"""Patch width of the input correlation that inspect and fixed mode estimate from --input-data by default."""


def _structure(per_position: bool | None, patch_covariance: int | None, describe_positions: bool
               ) -> dict[str, Any]:
    """What ``InputStats.from_data`` keeps beyond per-channel moments, from the command line. Neither option
    given and ``describe_positions`` (inspect, fixed mode): per position with the 3x3 patch correlation, the
    description under which the analytic statistics of real images hold (docs/math.md 1.1), marked ``auto``."""
    if per_position is None and patch_covariance is None and describe_positions:
        return {"per_position": True, "patch_covariance": DEFAULT_PATCH_COVARIANCE, "auto": True}
    return {"per_position": bool(per_position), "patch_covariance": patch_covariance, "auto": False}


def _load_inputs(run: _Run, model_source: str, weights: str | None, trust: dict[str, Any], input_shape: str | None,
                 input_mean: str | None, input_std: str | None, input_data: str | None, seed: int,
                 structure: dict[str, Any]) -> tuple[LoadedModel, tuple[int, ...], InputStats]:
    mean, std = _floats(input_mean, "--input-mean"), _floats(input_std, "--input-std")
    shape = _shape(input_shape)
    torch.manual_seed(seed)  # an import spec builds its model with random initial weights
    try:
        loaded = run.step("loading the model", lambda: load_model(model_source, weights=weights, **trust))
    except ModelLoadError as err:
        raise _usage(err) from err
    if shape is None:
        if "input_shape" not in loaded.defaults:
            raise InputError("--input-shape is required, e.g. --input-shape 1,3,224,224")
        shape = tuple(int(s) for s in loaded.defaults["input_shape"])
    return loaded, shape, _resolve_stats(loaded, shape, mean, std, input_data, run, structure)


def _fail(run: _Run, err: GraphnormError) -> None:
    if run.debug:
        traceback.print_exc()
    click.echo(f"error: {err}", err=True)
    if not run.debug:
        click.echo("(run with --debug for the traceback)", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="graphnorm")
def main() -> None:
    """graphnorm: batch-independent normalization by analytic moment propagation."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C (SIGINT): ``finally`` blocks remove temporary files, no partial output."""
    click.echo(f"graphnorm: stopped by signal {signum}; nothing written", err=True)
    raise SystemExit(128 + signum)


@main.command("convert")
@click.argument("model_source", metavar="MODEL")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(MODES), default="analytic", show_default=True,
              help="What every BatchNorm becomes (docs/convert.md).")
@_model_input_options
@click.option("--calibrate", type=click.Choice(CALIBRATIONS), default="auto", show_default=True,
              help="Calibrate the statistics to the trained running statistics (auto: where trained), to "
                   "statistics measured on --input-data, or not at all (docs/convert.md).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="Warn (fail with --strict) below this top-1 agreement with the original.")
@click.option("--max-output-error", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Warn (fail with --strict) above this median relative output error against the original.")
@click.option("--agreement-samples", type=click.IntRange(min=0), default=16, show_default=True,
              help="Inputs drawn from the input statistics for the agreement check when --input-data is not given.")
@click.option("--strict", is_flag=True, help="Fail, writing nothing, when the converted model disagrees with the "
                                             "original beyond --min-agreement / --max-output-error, or when an op "
                                             "has no closed-form rule (--fallback error).")
@click.option("--stochastic-batch", type=click.IntRange(min=4),
              help="Add BatchNorm-like noise of this virtual batch size in training.")
@click.option("--noise", type=click.Choice(["batch", "learned"]), default="batch", show_default=True,
              help="batch: BatchNorm's noise of --stochastic-batch; learned: a learned posterior over each "
                   "normalizer's scale and bias starting from it (--stochastic-batch defaults to 32; add "
                   "graphnorm.kl_divergence(model)/N to the loss; docs/training.md).")
@click.option("--normprop-c", type=click.FloatRange(min=0, min_open=True), default=1.21, show_default=True,
              help="NormProp's constant c.")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's).")
@click.option("--legacy-exporter", is_flag=True, help="Use the TorchScript ONNX exporter instead of the dynamo one.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the ONNX file with onnxruntime.")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-4, show_default=True, help="Verification rtol.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-5, show_default=True, help="Verification atol.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def convert_command(model_source: str, output: Path, mode: str, input_shape: str | None, input_mean: str | None,
                    input_std: str | None, input_data: str | None, weights: str | None, trust_pickle: bool,
                    trust_code: bool, allowed_packages: tuple[str, ...], calibrate: str, min_agreement: float,
                    max_output_error: float, agreement_samples: int,
                    strict: bool, stochastic_batch: int | None, noise: str, normprop_c: float,
                    spatial: bool | None, per_position: bool | None, patch_covariance: int | None,
                    accuracy: str | None, seed: int, fallback: str, fallback_samples: int,
                    leaf_modules: tuple[str, ...], opset: int | None,
                    legacy_exporter: bool, verify: bool, rtol: float,
                    atol: float, force: bool, as_json: bool, quiet: bool, debug: bool) -> None:
    """Rewrite every BatchNorm of MODEL and write OUTPUT (.onnx: exported and verified; .pt: a graphnorm file).

    MODEL is an import spec (package.module:attr naming a module or a function returning one, e.g.
    torchvision.models:resnet18), a graphnorm checkpoint .pt (the model spec it names is imported only with
    consent: --trust-code, --allow-package, or an allow-listed package), or, with --trust-pickle, a pickled
    module or a torch.export program (.pt2 from torch.export.save).
    """
    run = _Run(quiet, as_json, debug)
    if output.suffix not in (".onnx", ".pt"):
        raise InputError("OUTPUT must end in .onnx or .pt", param_hint="OUTPUT")
    if output.exists() and not force:
        raise InputError(f"{output} exists; pass --force to overwrite it")
    trust = _consent(trust_pickle, trust_code, allowed_packages)
    loaded, shape, stats = _load_inputs(run, model_source, weights, trust, input_shape, input_mean, input_std,
                                        input_data, seed, _structure(per_position, patch_covariance, mode == "fixed"))
    if output.suffix == ".pt" and loaded.spec is None:
        raise InputError("a .pt OUTPUT stores the model's import spec; load MODEL from an import spec")
    if calibrate == "data" and input_data is None:
        raise InputError("--calibrate data measures the statistics on --input-data FILE; give it")
    data = labels = None
    if input_data is not None:
        try:
            data, labels = load_input_data(input_data), load_labels(input_data)
        except GraphnormError as err:
            raise _usage(err) from err
    kwargs = {"input_shape": list(shape), "mode": mode, "stochastic_batch": stochastic_batch, "noise": noise,
              "normprop_c": normprop_c, "spatial": "auto" if spatial is None else spatial,
              "accuracy": accuracy or "auto",
              "leaf_modules": list(leaf_modules),
              "fallback": "error" if strict else fallback, "fallback_samples": fallback_samples}
    checks = {"calibrate": calibrate, "data": data, "labels": labels, "agreement_samples": agreement_samples}
    _execute(run, loaded, output, stats, kwargs, checks, opset=opset, legacy=legacy_exporter, verify=verify,
             tolerances=(rtol, atol), thresholds=(min_agreement, max_output_error), strict=strict,
             data_source=input_data)


def _execute(run: _Run, loaded: LoadedModel, output: Path, stats: InputStats, kwargs: dict[str, Any],
             checks: dict[str, Any], *, opset: int | None, legacy: bool, verify: bool,
             tolerances: tuple[float, float], thresholds: tuple[float, float], strict: bool,
             data_source: str | None) -> None:
    """Convert with ``kwargs`` (the arguments a .pt output stores) and ``checks`` (calibration and agreement
    inputs, not stored: the calibration itself is in the state_dict), check agreement, write OUTPUT."""
    from .export import export_onnx
    from .rewrite import convert

    start = time.perf_counter()
    shape, mode = tuple(kwargs["input_shape"]), kwargs["mode"]
    try:
        converted = run.step(f"converting ({mode})", lambda: convert(loaded.model, stats, **kwargs, **checks))
        problems, notes = _agreement_warnings(converted.graphnorm_log, *thresholds)
        if not converted.graphnorm_log.rewritten and not converted.graphnorm_log.skipped:
            notes.insert(0, "MODEL has no BatchNorm: nothing to rewrite, OUTPUT computes what MODEL computes")
        run.notes.extend(notes)
        if problems and strict:
            raise GraphnormError(f"{problems[0]} (--strict: nothing written)")
        export = None
        if output.suffix == ".onnx":
            export = run.step("exporting to ONNX and verifying", lambda: export_onnx(
                converted, output, input_shape=shape, opset=opset, verify=verify, legacy=legacy,
                rtol=tolerances[0], atol=tolerances[1]))
        else:
            # The calibration lives in the state_dict; rebuilding needs only the structure it implies.
            calibrated = converted.graphnorm_log.calibration != "none" and mode != "fixed"
            save_converted(output, converted, spec=loaded.spec or "", stats=stats,
                           convert_kwargs={**kwargs, "calibrate": "running" if calibrated else "none"})
    except GraphnormError as err:
        _fail(run, err)
    except OSError as err:  # the output directory is read-only, full, gone...
        _fail(run, GraphnormError(f"cannot write {output}: {err.strerror or first_line(err)}; check that its "
                                  "directory exists, is writable and has free space"))
    seconds = time.perf_counter() - start
    log = converted.graphnorm_log
    if run.as_json:
        payload = {"output": str(output), "mode": mode, "input_shape": list(shape),
                   "input_mean": stats.mean.tolist(), "input_std": stats.std.tolist(), "notes": run.notes,
                   "warnings": problems, "conversion": log.to_dict(),
                   "export": export.to_dict() if export is not None else None, "seconds": seconds}
        click.echo(json.dumps(payload, indent=2))
    elif not run.quiet:
        for note in run.notes:
            run.out.print(f"note: {note}")
        run.out.print(_summary_table(log, export, seconds, output, data_source))
    for problem in problems:
        if not run.as_json:
            click.echo(f"warning: {problem}", err=True)


@main.command("inspect")
@click.argument("model_source", metavar="MODEL")
@_model_input_options
@click.option("--data", type=click.Path(),
              help="Samples (.npy/.npz/.pt) for the measured columns (default: drawn from the input statistics).")
@click.option("--samples", type=click.IntRange(min=1), default=1024, show_default=True,
              help="How many inputs to draw when --data is not given.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Batch size of the measurement (bounds its memory).")
@click.option("--no-empirical", is_flag=True, help="Analytic columns only (no measurement).")
@click.option("--normalize", type=click.Choice(["as-is", "analytic"]), default="as-is", show_default=True,
              help="Measure the model as it is, or with every BatchNorm using the analytic statistics.")
@click.option("--format", "output_format", type=click.Choice(["table", "json", "markdown"]), default="table",
              show_default=True, help="Report format on stdout.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a signal-propagation plot (PNG).")
@click.option("--only", type=click.Choice(["bn"]), help="bn: only the BatchNorm inputs.")
@click.option("--force", is_flag=True, help="Overwrite the --plot file if it exists.")
def inspect_command(model_source: str, input_shape: str | None, input_mean: str | None, input_std: str | None,
                    input_data: str | None, weights: str | None, trust_pickle: bool, trust_code: bool,
                    allowed_packages: tuple[str, ...], leaf_modules: tuple[str, ...], spatial: bool | None,
                    per_position: bool | None, patch_covariance: int | None, accuracy: str | None, seed: int,
                    fallback: str, fallback_samples: int, debug: bool, data: str | None, samples: int,
                    batch_size: int, no_empirical: bool,
                    normalize: str, output_format: str, plot_path: Path | None, only: str | None,
                    force: bool) -> None:
    """Analytic statistics of every activation of MODEL beside measured ones (table, JSON or Markdown), and a
    signal-propagation plot. MODEL takes the same forms as in `graphnorm convert`."""
    from .inspection import inspect

    run = _Run(quiet=False, as_json=output_format == "json", debug=debug)
    if plot_path is not None:
        if plot_path.suffix.lower() != ".png":
            raise InputError("the plot file must end in .png", param_hint="--plot")
        if plot_path.exists() and not force:
            raise InputError(f"{plot_path} exists; pass --force to overwrite it")
    trust = _consent(trust_pickle, trust_code, allowed_packages)
    loaded, shape, stats = _load_inputs(run, model_source, weights, trust, input_shape, input_mean, input_std,
                                        input_data, seed, _structure(per_position, patch_covariance, True))
    samples_data = None
    if data is not None:
        try:
            samples_data = load_input_data(data)
        except GraphnormError as err:
            raise _usage(err) from err
    try:
        report = inspect(loaded.model, stats, input_shape=shape, data=samples_data, samples=samples, seed=seed,
                         spatial="auto" if spatial is None else spatial, accuracy=accuracy or "accurate",
                         leaf_modules=leaf_modules, batch_size=batch_size, normalize=normalize,
                         empirical=not no_empirical, progress=run.err.is_terminal, fallback=fallback,
                         fallback_samples=fallback_samples)
        if plot_path is not None:
            report.plot(plot_path)
    except GraphnormError as err:
        _fail(run, err)
    if only == "bn":
        report = report.only_batchnorm_inputs()
    if output_format == "json":
        click.echo(report.to_json())
    elif output_format == "markdown":
        click.echo(report.to_markdown(), nl=False)
    else:
        for note in run.notes:
            run.out.print(f"note: {note}")
        run.out.print(report.to_table())
