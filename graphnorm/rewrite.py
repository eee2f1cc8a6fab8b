"""BatchNorm discovery and the rewrites behind :func:`graphnorm.convert` (MATH.md sections 3 and 4).

Every BatchNorm *call site* is rewritten on its own (a module called twice gets two normalizers sharing its
parameters; the upstream fx Conv+BN fuser gets this wrong), in a copy of the model: the input model is never
touched. Each rewrite is recorded in a :class:`ConversionLog`, and so is every site left alone, with why.

Modes:

- ``analytic``: :class:`~graphnorm.normalizers.AnalyticNorm` at every site.
- ``reparam``: a BatchNorm right after a Linear/Conv whose output has no other user (and which is called
  once) is folded into that layer's weight and bias by ``torch.nn.utils.parametrize``; other sites fall back
  to the analytic normalizer.
- ``normprop``: Normalization Propagation as published: the input standardized with the input statistics,
  each foldable Linear/Conv + BatchNorm becomes ``gamma W x/(c ||W_o||) + beta``, followed where a ReLU comes
  next by ``(relu(u) - 0.398942)/0.583819``; other sites fall back to the analytic normalizer.
- ``fixed``: each site keeps BatchNorm's eval form with the analytic statistics of its input as running
  statistics, computed once (data-free recalibration), or with statistics measured on data
  (``calibrate="data"``).

Calibration (:mod:`graphnorm.calibration`): in the analytic, reparam and NormProp modes each normalizer can be
calibrated to target statistics, by default the running statistics of a trained BatchNorm, so that the
converted model computes what the original computes in eval at conversion (MATH.md section 7).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from torch import fx

from .agreement import Agreement, compare_outputs, evaluating
from .calibration import Calibrate, has_trained_statistics, measure_batchnorm_inputs, resolve_calibration
from .converted import ConvertedModule, StatisticsState
from .errors import GraphnormError
from .exported import as_module
from .graphs import attribute_value
from .normalizers import (
    NOISE_KINDS,
    RELU_MEAN,
    RELU_STD,
    AnalyticNorm,
    BatchNoise,
    Calibration,
    ChannelAffine,
    FixedBatchNorm,
    NormalizedBias,
    NormalizedWeight,
    NormPropLayer,
    ReparamState,
)
from .ops import spelling_of
from .pickling import make_picklable
from .program import StatisticsSummary
from .propagate import ACCURACIES, Accuracy, MomentPropagator, MomentTable, auto_spatial
from .rules.normalizers import REPARAM, raw_layer_output
from .sampling import DEFAULT_SAMPLES, SampledNode
from .stats import InputStats
from .trace import CAPTURE, OP_KEY, SPECIALIZED, trace

__all__ = ["ConversionLog", "Rewrite", "Skip", "convert"]

Mode = Literal["analytic", "reparam", "normprop", "fixed"]
Noise = Literal["batch", "learned"]
MODES = ("analytic", "reparam", "normprop", "fixed")


@dataclass(frozen=True)
class Rewrite:
    """One BatchNorm call site and what it became, and what its statistics were calibrated to."""

    node: str
    module_path: str | None
    form: str  # "analytic", "reparam", "normprop", "fixed"
    detail: str = ""
    calibration: str = "none"  # "running", "data" or "none"


@dataclass(frozen=True)
class Skip:
    """A BatchNorm call site left as it was, and why."""

    node: str
    module_path: str | None
    reason: str


@dataclass
class ConversionLog:
    """What :func:`convert` did: the mode, the calibration, every rewritten site, every skipped one, and how
    the converted model agrees with the original (:class:`~graphnorm.agreement.Agreement`, or None when not
    checked)."""

    mode: str
    rewritten: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    calibration: str = "none"
    trained_sites: int = 0  # sites whose BatchNorm had trained running statistics
    agreement: Agreement | None = None
    capture: str = "symbolic"  # how the graph was captured (graphnorm.trace)
    specialized: list[str] = field(default_factory=list)  # where the graph took a branch for the input shape
    sampled: list[SampledNode] = field(default_factory=list)  # ops whose moments the sampled fallback estimates
    fallback_samples: int | None = None  # K of the sampled fallback (None: fallback="error")
    statistics: StatisticsSummary | None = None  # the recorded statistics program (None: the model has none)

    @property
    def counts(self) -> dict[str, int]:
        """Rewritten sites per form, e.g. ``{"reparam": 19, "analytic": 1}``."""
        return dict(Counter(r.form for r in self.rewritten))

    @property
    def calibrated(self) -> int:
        """How many sites were calibrated."""
        return sum(r.calibration != "none" for r in self.rewritten)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "calibration": self.calibration, "trained_sites": self.trained_sites,
                "counts": self.counts,
                "rewritten": [asdict(r) for r in self.rewritten], "skipped": [asdict(s) for s in self.skipped],
                "agreement": self.agreement.to_dict() if self.agreement is not None else None,
                "capture": self.capture, "specialized": self.specialized,
                "fallback_samples": self.fallback_samples, "sampled": [asdict(n) for n in self.sampled],
                "statistics": self.statistics.to_dict() if self.statistics is not None else None}

    def __str__(self) -> str:
        forms = ", ".join(f"{count} {form}" for form, count in self.counts.items()) or "none"
        calibrated = ("not calibrated" if self.calibration == "none"
                      else f"{self.calibrated} calibrated to {self.calibration} statistics")
        lines = [f"mode {self.mode}: {len(self.rewritten)} BatchNorm call site(s) rewritten ({forms}), "
                 f"{len(self.skipped)} skipped, {calibrated}"]
        lines += [f"  skipped {s.node} ({s.module_path or 'functional'}): {s.reason}" for s in self.skipped]
        if self.specialized:
            lines.append(f"  captured {self.capture}; specialized to the input shape at: "
                         + "; ".join(self.specialized))
        if self.sampled:
            lines.append(f"  {len(self.sampled)} op(s) without a closed-form rule, moments from "
                         f"{self.fallback_samples} samples:")
            lines += [f"    {node.describe()}" for node in self.sampled]
        if self.statistics is not None:
            lines.append(f"  {self.statistics}")
        if self.agreement is not None:
            lines.append(f"  agreement with the original: {self.agreement}")
        return "\n".join(lines)


@dataclass
class BatchNormSite:
    node: fx.Node
    module_path: str | None
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    eps: float
    tracked_batches: int | None = None  # num_batches_tracked of a BatchNorm module
    input_name: str = field(init=False)  # the node feeding the BatchNorm in the original graph

    def __post_init__(self) -> None:
        self.input_name = self.node.args[0].name


def find_sites(graph_module: fx.GraphModule, random_nodes: set[str], log: ConversionLog) -> list[BatchNormSite]:
    sites = []
    for node in graph_module.graph.nodes:
        if node.meta.get(OP_KEY) != "batch_norm":
            continue
        path = str(node.target) if node.op == "call_module" else None
        if node.args[0].name not in random_nodes:
            log.skipped.append(Skip(node.name, path, "its input does not depend on the model input"))
            continue
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            tracked = getattr(module, "num_batches_tracked", None)
            sites.append(BatchNormSite(node, path, module.weight, module.bias, module.running_mean, module.running_var,
                                       module.eps, None if tracked is None else int(tracked)))
            continue
        try:
            args = [node.args[0], *(attribute_value(graph_module, a) for a in node.args[1:])]
            kwargs = {k: attribute_value(graph_module, v) for k, v in node.kwargs.items() if k != "input"}
        except LookupError as missing:
            log.skipped.append(Skip(node.name, None, f"its statistics or affine parameters are computed in the "
                                                     f"graph (node '{missing}'), not parameters or buffers"))
            continue
        _, params = spelling_of(node, graph_module).canonicalize(*args, **kwargs)
        sites.append(BatchNormSite(node, None, params["weight"], params["bias"], params["running_mean"],
                                   params["running_var"], float(params["eps"])))
    return sites


def foldable_producer(graph_module: fx.GraphModule, node: fx.Node, shapes: dict[str, tuple[int, ...]],
                      call_counts: Counter) -> tuple[fx.Node | None, str]:
    """The Linear/Conv node whose output a per-channel normalization at ``node`` (channel dim 1) can be folded
    into, or None and why not: the producer must be a Linear/Conv module called once, whose output only
    ``node`` uses, and whose output channels are dim 1 (a Linear on ``(N, C, L)`` acts on L)."""
    producer = node.args[0]
    key = producer.meta.get(OP_KEY)
    if producer.op != "call_module" or key not in ("conv", "linear"):
        return None, "no Linear/Conv module directly before it"
    if len(producer.users) != 1:
        return None, f"the output of '{producer.target}' has other users"
    if call_counts[str(producer.target)] != 1:
        return None, f"module '{producer.target}' is called at several sites"
    if parametrize.is_parametrized(graph_module.get_submodule(producer.target)):
        return None, f"module '{producer.target}' is parametrized already"
    if key == "linear" and len(shapes[producer.name]) != 1:
        return None, "the Linear acts on the last dim but BatchNorm normalizes dim 1"
    return producer, ""


def call_counts(graph_module: fx.GraphModule) -> Counter:
    """How many call sites each module path has in the graph."""
    return Counter(str(n.target) for n in graph_module.graph.nodes if n.op == "call_module")


@dataclass
class _PendingCalibration:
    """A normalizer to calibrate once the converted model has computed its analytic statistics."""

    calibration: Calibration
    analytic: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # () -> (m_a, s_a) with identity calibration
    target_mean: torch.Tensor
    target_var: torch.Tensor
    eps: float
    needs_statistics: bool = True  # False for NormProp, whose implicit statistics are functions of W alone

    def fit(self) -> None:
        self.calibration.fit(*self.analytic(), self.target_mean, self.target_var, self.eps)


class _Rewriter:
    def __init__(self, graph_module: fx.GraphModule, propagator: MomentPropagator, table: MomentTable,
                 eps: float | None, log: ConversionLog, targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 noise: str = "batch"):
        self.gm = graph_module
        self.graph = graph_module.graph
        self.propagator = propagator
        self.table = table
        self.eps = eps
        self.log = log
        self.targets = targets  # BatchNorm node -> (mean, var) to calibrate to
        self.noise = noise  # the kind of noise of noisy normalizers (graphnorm.normalizers.NOISE_KINDS)
        self.pending: list[_PendingCalibration] = []
        self.analytic_sites: list[tuple[str, str]] = []
        self.reparam_sites: list[tuple[str, str]] = []
        self._used_names: set[str] = set()
        self._call_counts = call_counts(graph_module)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _site_eps(self, site: BatchNormSite) -> float:
        return float(self.eps) if self.eps is not None else site.eps

    def _install(self, base: str, module: nn.Module) -> str:
        """Put ``module`` into the graph module at path ``base`` if it is still free (a BatchNorm's own path for
        its first call site, so its parameter names stay the BatchNorm's), else under a fresh name."""
        name, k = base, 1
        while name in self._used_names:
            name, k = f"{base}_site{k}", k + 1
        self._used_names.add(name)
        self.gm.add_submodule(name, module)
        return name

    def _replace_node(self, node: fx.Node, module_name: str, source: fx.Node) -> fx.Node:
        with self.graph.inserting_after(node):
            new = self.graph.call_module(module_name, (source,))
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    def _input_moments(self, site: BatchNormSite) -> tuple[torch.Tensor, torch.Tensor]:
        """Analytic moments of the site's input in the original graph (the starting statistics; a converted
        model recomputes them from its own graph before it runs)."""
        moments = self.table[site.input_name]
        return moments.mean.detach(), moments.var.detach()

    def _foldable_producer(self, site: BatchNormSite) -> tuple[fx.Node | None, str]:
        return foldable_producer(self.gm, site.node, self.propagator.shapes, self._call_counts)

    def _calibrate(self, site: BatchNormSite, calibration: Calibration,
                   analytic: Callable[[], tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor | None = None,
                   needs_statistics: bool = True) -> str:
        """Queue ``calibration`` to be fitted to the site's target statistics, if it has any; ``bias`` is a
        folded producer's own bias, which the target mean includes and the normalized quantity does not.
        Returns the calibration source for the log."""
        target = self.targets.get(site.node.name)
        if target is None:
            return "none"
        mean, var = target
        if bias is not None:
            mean = mean - bias.detach().to(mean)
        self.pending.append(_PendingCalibration(calibration, analytic, mean, var, site.eps, needs_statistics))
        return self.log.calibration

    # -- the rewrites ----------------------------------------------------------------------------------------------
    def analytic(self, site: BatchNormSite, stochastic_batch: int | None, detail: str = "") -> None:
        x = site.node.args[0]
        channels = self.propagator.shapes[site.input_name][0]
        norm = AnalyticNorm(channels, site.weight, site.bias, self._site_eps(site), stochastic_batch, self.noise)
        norm.statistics = self._input_moments(site)
        name = self._install(site.module_path or f"{site.node.name}_norm", norm)
        self._replace_node(site.node, name, x)
        self.analytic_sites.append((name, x.name))
        calibrated = self._calibrate(site, norm.calibration, norm.normalizing_statistics)
        self.log.rewritten.append(Rewrite(site.node.name, site.module_path, "analytic", detail, calibrated))

    def fixed(self, site: BatchNormSite) -> None:
        target = self.targets.get(site.node.name)
        mean, var = target if target is not None else self._input_moments(site)
        # float32 statistics, float64 for a float64 model (FixedBatchNorm casts them to what its input needs).
        wide = site.weight.dtype == torch.float64 if site.weight is not None else mean.dtype == torch.float64
        dtype = torch.float64 if wide and target is None else torch.float32
        fixed = FixedBatchNorm(mean.to(dtype), var.to(dtype), site.weight, site.bias, self._site_eps(site))
        name = self._install(site.module_path or f"{site.node.name}_fixed", fixed)
        self._replace_node(site.node, name, site.node.args[0])
        detail = "statistics measured on data" if target is not None else "analytic statistics"
        self.log.rewritten.append(Rewrite(site.node.name, site.module_path, "fixed", detail,
                                          self.log.calibration if target is not None else "none"))

    def _fold_or_fall_back(self, site: BatchNormSite, stochastic_batch: int | None
                           ) -> tuple[fx.Node, nn.Module, torch.Tensor | None] | None:
        """The Linear/Conv node and module to fold ``site`` into, with the module's own bias (inside a
        calibration target, outside the folded statistics); None after falling back to the analytic normalizer."""
        producer, why_not = self._foldable_producer(site)
        if producer is None:
            self.analytic(site, stochastic_batch, f"fallback: {why_not}")
            return None
        layer = self.gm.get_submodule(producer.target)
        return producer, layer, None if layer.bias is None else layer.bias.detach().clone()

    def reparam(self, site: BatchNormSite, stochastic_batch: int | None) -> None:
        folding = self._fold_or_fall_back(site, stochastic_batch)
        if folding is None:
            return
        producer, layer, own_bias = folding
        groups = getattr(layer, "groups", 1)
        state = ReparamState(groups, self._site_eps(site), tuple(self.propagator.shapes[producer.name]),
                             Calibration(layer.weight.shape[0], layer.weight))
        state.update(*self._raw_statistics(layer, producer))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                  device=layer.weight.device), requires_grad=False)
        parametrize.register_parametrization(layer, "weight", NormalizedWeight(state, site.weight))
        parametrize.register_parametrization(layer, "bias", NormalizedBias(state, site.weight, site.bias))
        make_picklable(layer)
        layer.graphnorm_op = REPARAM
        producer.meta[OP_KEY] = REPARAM
        site.node.replace_all_uses_with(producer)
        self.graph.erase_node(site.node)
        self.reparam_sites.append((str(producer.target), producer.args[0].name))
        detail = f"folded into '{producer.target}'"
        if stochastic_batch is not None:
            name = self._install(site.module_path or f"{site.node.name}_noise",
                                 BatchNoise(site.weight, site.bias, stochastic_batch, self.noise))
            with self.graph.inserting_after(producer):
                noisy = self.graph.call_module(name, (producer,))
            producer.replace_all_uses_with(noisy, delete_user_cb=lambda user: user is not noisy)
            kind = "learned noise starting from BatchNorm's" if self.noise == "learned" else "BatchNorm noise"
            detail += f", {kind} of batch {stochastic_batch} after it"
        calibrated = self._calibrate(site, state.calibration, lambda: (state.mu, state.sigma), own_bias)
        self.log.rewritten.append(Rewrite(site.node.name, site.module_path, "reparam", detail, calibrated))

    def _raw_statistics(self, layer: nn.Module, producer: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            raw = raw_layer_output(layer, self.table[producer.args[0].name], self.propagator.shapes[producer.name])
        return raw.mean, raw.var

    def normprop(self, site: BatchNormSite, c: float, post_relu_correction: bool) -> None:
        folding = self._fold_or_fall_back(site, None)
        if folding is None:
            return
        producer, layer, own_bias = folding
        normprop = NormPropLayer(layer, site.weight, site.bias, c)
        name = self._install(str(producer.target), normprop)
        new = self._replace_node(producer, name, producer.args[0])
        site.node.replace_all_uses_with(new)
        self.graph.erase_node(site.node)
        detail = f"'{producer.target}' normalized by its weight norm"
        users = list(new.users)
        if post_relu_correction and len(users) == 1 and users[0].meta.get(OP_KEY) == "relu":
            relu = users[0]
            correction = self._install(f"{relu.name}_normprop",
                                       ChannelAffine(1.0 / RELU_STD, -RELU_MEAN / RELU_STD))
            with self.graph.inserting_after(relu):
                corrected = self.graph.call_module(correction, (relu,))
            relu.replace_all_uses_with(corrected, delete_user_cb=lambda user: user is not corrected)
            detail += ", ReLU output re-centred and re-scaled"
        scale = normprop.implicit_scale
        calibrated = self._calibrate(site, normprop.calibration, lambda: (torch.zeros_like(scale()), scale()),
                                     own_bias, needs_statistics=False)
        self.log.rewritten.append(Rewrite(site.node.name, site.module_path, "normprop", detail, calibrated))

    def standardize_input(self, stats: InputStats) -> None:
        placeholder = next(n for n in self.graph.nodes if n.op == "placeholder")
        name = "graphnorm_input_standardization"
        # A channel that is constant in the data (std 0) carries no information: it is mapped to 0.
        inverse = torch.where(stats.std > 0, 1.0 / stats.std.clamp_min(1e-300), torch.zeros_like(stats.std))
        self.gm.add_submodule(name, ChannelAffine(inverse.float(), (-stats.mean * inverse).float()))
        with self.graph.inserting_after(placeholder):
            standardized = self.graph.call_module(name, (placeholder,))
        placeholder.replace_all_uses_with(standardized, delete_user_cb=lambda user: user is not standardized)


def _calibration_targets(graph_module: fx.GraphModule, sites: list[BatchNormSite], source: str,
                         selected: set[str], data: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if source == "running":
        return {site.node.name: (site.running_mean.detach().double(), site.running_var.detach().double())
                for site in sites if site.node.name in selected}
    if source == "data":
        with evaluating(graph_module):
            return measure_batchnorm_inputs(graph_module, sites, data)
    return {}


def convert(model: nn.Module | torch.export.ExportedProgram, stats: InputStats, *, input_shape: Iterable[int],
            mode: Mode = "analytic",
            eps: float | None = None, stochastic_batch: int | None = None, noise: Noise = "batch",
            normprop_c: float = 1.21,
            leaf_modules: Iterable[type | str] = (), concrete_args: dict[str, Any] | None = None,
            spatial: bool | Literal["auto"] = "auto", calibrate: Calibrate = "auto", data: Any = None,
            labels: Any = None, accuracy: Accuracy | Literal["auto"] = "auto",
            agreement_samples: int = 16, fallback: Literal["sample", "error"] = "sample",
            fallback_samples: int = DEFAULT_SAMPLES) -> ConvertedModule:
    """Rewrite every BatchNorm of ``model`` into a batch-independent normalizer (see the module docstring).

    Returns a new :class:`~graphnorm.converted.ConvertedModule` (a ``torch.fx.GraphModule``) with
    ``graphnorm_log``; ``model`` and its parameters are not modified. ``input_shape`` is the shape of one
    input batch (batch first); ``stats`` the per-channel input statistics. ``eps`` overrides every BatchNorm's
    own eps. ``stochastic_batch=M`` (analytic and reparam modes) adds BatchNorm-like noise of a virtual
    batch of size M in training; with ``noise="learned"`` that noise is the initial value of a learned
    per-channel posterior over the normalizers' scale and bias (:mod:`graphnorm.noise`; ``stochastic_batch``
    defaults to 32 then), whose KL term :func:`graphnorm.kl_divergence` gives. ``spatial=True`` computes
    statistics with per-unit moments (exact zero padding; slower, for small images); ``"auto"`` (default)
    does so in ``fixed`` mode where borders matter (:func:`graphnorm.propagate.auto_spatial`) and keeps the
    cheap per-channel form for the modes that recompute statistics every training step. Per-position input
    statistics and an input correlation template (``InputStats.from_data(..., per_position=True,
    patch_covariance=k)``) are used by ``fixed`` mode; the trainable modes use their per-channel summary.
    ``accuracy`` (``"auto"``: ``"accurate"`` in ``fixed`` mode, ``"fast"`` otherwise) chooses whether the
    statistics correct activations for skewed inputs (:mod:`graphnorm.rules.skewness`); the trainable modes
    recompute their statistics every step and only take ``"fast"``.

    ``calibrate`` chooses what the normalizers' statistics are calibrated to (:mod:`graphnorm.calibration`):
    ``"auto"`` (trained running statistics where they exist), ``"running"``, ``"data"`` (measured on ``data``)
    or ``"none"``. ``data`` (a tensor ``[N, C, ...]`` or a re-iterable of batches) is also where the converted
    model is compared with the original (``graphnorm_log.agreement``; with ``labels``, both accuracies);
    without it, ``agreement_samples`` inputs are drawn from ``stats`` (0 skips the comparison).

    ``fallback="sample"`` estimates the moments of ops without a closed-form rule from ``fallback_samples``
    Gaussian samples with common random numbers (:mod:`graphnorm.sampling`; listed in
    ``graphnorm_log.sampled``); ``fallback="error"`` raises :class:`~graphnorm.UnsupportedOpError` instead.
    """
    if mode not in MODES:
        raise GraphnormError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if noise not in NOISE_KINDS:
        raise GraphnormError(f"noise must be one of {', '.join(NOISE_KINDS)}; got {noise!r}")
    if noise == "learned" and stochastic_batch is None:
        stochastic_batch = 32
    if stochastic_batch is not None and mode not in ("analytic", "reparam"):
        raise GraphnormError(f"stochastic_batch applies to the analytic and reparam modes, not to {mode!r}")
    if stochastic_batch is not None and (not isinstance(stochastic_batch, int) or stochastic_batch < 4):
        raise GraphnormError(f"stochastic_batch must be an integer >= 4, got {stochastic_batch!r}")
    if normprop_c <= 0:
        raise GraphnormError(f"normprop_c must be positive, got {normprop_c}")
    if agreement_samples < 0:
        raise GraphnormError(f"agreement_samples must be >= 0, got {agreement_samples}")
    input_shape = tuple(int(s) for s in input_shape)
    stats.validate_for(input_shape)
    if spatial == "auto":
        spatial = mode == "fixed" and auto_spatial(input_shape, stats)
    if accuracy == "auto":
        accuracy = "accurate" if mode == "fixed" else "fast"
    if accuracy not in ACCURACIES or (accuracy == "accurate" and mode != "fixed"):
        raise GraphnormError(f"accuracy={accuracy!r}: 'accurate' applies to fixed mode (the trainable modes "
                             "recompute their statistics every step, in the 'fast' form); use 'fast' or 'auto'")
    if mode != "fixed":
        stats = stats.channel_summary()
    model = as_module(model)  # an ExportedProgram: its graph, layers as modules (the reference of the agreement)
    graph_module = trace(copy.deepcopy(model), leaf_modules=leaf_modules, concrete_args=concrete_args,
                         input_shape=input_shape)
    propagator = MomentPropagator(graph_module, input_shape, spatial=spatial, batch_norm="analytic",
                                  concrete_args=concrete_args, fallback=fallback, fallback_samples=fallback_samples,
                                  accuracy=accuracy)
    with torch.no_grad():
        table = propagator.run(stats)
    log = ConversionLog(mode, capture=graph_module.meta.get(CAPTURE, "symbolic"),
                        specialized=list(graph_module.meta.get(SPECIALIZED, [])),
                        sampled=list(propagator.sampled.values()),
                        fallback_samples=propagator.fallback.samples if propagator.fallback else None)
    sites = find_sites(graph_module, propagator.random_nodes, log)
    log.calibration, selected = resolve_calibration(calibrate, mode, sites, data)
    log.trained_sites = sum(has_trained_statistics(site) for site in sites)
    targets = _calibration_targets(graph_module, sites, log.calibration, selected, data)
    rewriter = _Rewriter(graph_module, propagator, table, eps, log, targets, noise)
    for site in sites:
        if mode == "analytic":
            rewriter.analytic(site, stochastic_batch)
        elif mode == "fixed":
            rewriter.fixed(site)
        elif mode == "reparam":
            rewriter.reparam(site, stochastic_batch)
        else:
            rewriter.normprop(site, normprop_c, post_relu_correction=not targets)
    if mode == "normprop" and not targets:
        rewriter.standardize_input(stats)
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    converted = ConvertedModule(graph_module, graph_module.graph, type(model).__name__ + "Converted")
    converted.graphnorm_log = log
    converted.__dict__["_graphnorm_state"] = StatisticsState(
        stats, input_shape, spatial, concrete_args, propagator.fallback, rewriter.analytic_sites,
        rewriter.reparam_sites)
    if rewriter.pending:
        _fit_calibrations(converted, rewriter.pending)
    converted.record_statistics_program()
    converted.train(model.training)
    if agreement_samples or data is not None:
        log.agreement = compare_outputs(model, converted, input_shape=input_shape, stats=stats, data=data,
                                        labels=labels, samples=agreement_samples)
    return converted


def _fit_calibrations(converted: ConvertedModule, pending: list[_PendingCalibration]) -> None:
    """Fit every queued calibration to the analytic statistics the converted model computes itself in eval (so
    that, at these weights, it computes exactly what BatchNorm with the target statistics computes).

    NormProp's implicit statistics are functions of its weight alone: fitted first. The outputs of analytic and
    reparam normalizers do not depend on their calibration (their rules restart from
    ``(beta, gamma^2 v/(v+eps))``), so one pass after that gives every other site its statistics. Fitting
    writes the calibration buffers, so the next call recomputes the statistics with them (version counters)."""
    converted.eval()
    with torch.no_grad():
        for item in pending:
            if not item.needs_statistics:
                item.fit()
        converted.refresh_statistics(force=True)
        for item in pending:
            if item.needs_statistics:
                item.fit()
