"""The statistics pass as code: moment propagation recorded once into straight-line torch programs.

A converted model needs, before every training step, the analytic moments of every normalizer's input as
functions of the current weights. Rather than interpreting its graph on :class:`~graphnorm.Moments` at every
call, conversion runs the propagation once under ``torch.fx.experimental.proxy_tensor.make_fx`` with the
model's parameters and buffers as inputs: the rules' torch operations become an fx graph of ATen ops (the
way JAX turns a transformation into a new program), one for training and one for eval (noise changes the
moments). :class:`StatisticsProgram` holds both and becomes a submodule of the converted model, whose own
graph then reads

    statistics = graphnorm_statistics(input_mean, input_var, <the parameters it needs>)
    ... the network, each normalizer called with its (mean, var) ...

so its forward is "statistics from the parameters, then the network": no interpreter, op-table look-up or
Python cache key in training; torch.compile sees one graph; a pickled model carries its statistics code.

The recorded programs are device- and dtype-generic: factory ops take the device of the input statistics
(which move with ``.to(device)``), the parameters are cast at entry to the recording dtype (float32, or
float64 for a float64 model), so statistics are computed in float32 or better whatever the parameters' or
autocast's dtype, and constants (sampled-fallback draws, quadrature tables) are buffers.

In eval the results are cached (eager only) and recomputed when a parameter or buffer changed (version
counters, storage) or after :meth:`StatisticsProgram.invalidate`; under ``torch.compile`` the eval program
simply runs (no data pointers of fake tensors are read).
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import fx
from torch._subclasses.fake_tensor import is_fake
from torch.fx.passes.dialect.common.cse_pass import CSEPass

from .normalizers import scaled_layer

__all__ = ["StatisticsProgram", "StatisticsSummary", "dispatched_ops", "folded_layer", "record_statistics"]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class RuleRecord:
    """What one node's moment rule put into a recorded program: its op key, the plain ATen ops and the fused ops
    (fused forms, kernel moments) it recorded."""

    key: str
    plain: int
    fused: int


@contextlib.contextmanager
def recording_of(node: str, key: str, records: dict[str, RuleRecord]) -> Iterator[None]:
    """Count the ops recorded while a rule runs, when it runs inside :func:`record_statistics` (else nothing)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is None:
        yield
        return
    graph = mode.tracer.graph
    before = len(graph.nodes)
    yield
    new = list(itertools.islice(reversed(graph.nodes), len(graph.nodes) - before))
    calls = [n for n in new if n.op == "call_function" and n.target is not operator.getitem]
    fused_ops = (torch.ops.graphnorm.kernel_moments.default, torch.ops.graphnorm.fused.default)
    fused = sum(n.target in fused_ops for n in calls)
    records[node] = RuleRecord(key, len(calls) - fused, fused)


@dataclass(frozen=True)
class StatisticsSummary:
    """The recorded statistics program of a converted model, for its log: the ops one training step runs, how
    many are fused (kernel moments and fused forms, :mod:`graphnorm.rules.fusion`, one op each), and, per op
    key, the nodes whose rules recorded plain ATen ops without a fused form (with their op count)."""

    ops: int
    fused: int
    unfused: dict[str, tuple[int, int]] = field(default_factory=dict)  # op key -> (nodes, plain ops)

    @classmethod
    def of(cls, program: fx.GraphModule, records: dict[str, RuleRecord]) -> StatisticsSummary:
        fused = sum(node.op == "call_module" and isinstance(getattr(program, str(node.target)), _fused_call_types())
                    for node in program.graph.nodes)
        unfused: dict[str, tuple[int, int]] = {}
        for record in records.values():
            if record.plain and not record.fused:
                nodes, ops = unfused.get(record.key, (0, 0))
                unfused[record.key] = (nodes + 1, ops + record.plain)
        return cls(op_count(program), fused, dict(sorted(unfused.items(), key=lambda item: -item[1][1])))

    def to_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "fused": self.fused,
                "unfused": {key: {"nodes": nodes, "ops": ops} for key, (nodes, ops) in self.unfused.items()}}

    def __str__(self) -> str:
        text = f"statistics program: {self.ops} ops per training step ({self.fused} fused)"
        if self.unfused:
            rules = (f"{key} ({nodes} node{'s' if nodes > 1 else ''}, {ops} ops)"
                     for key, (nodes, ops) in self.unfused.items())
            text += "; rules in plain ops, without a fused form: " + ", ".join(rules)
        return text


def _fused_call_types() -> tuple[type, ...]:
    from .rules.fusion import FusedCall  # the rules package imports this module
    from .rules.kernels import KernelMomentsCall

    return FusedCall, KernelMomentsCall


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in for parameters of ``dtype``: float32 or better."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Statistics are computed in their own dtype, not autocast's (CPU and CUDA autocast disabled)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def record_statistics(run: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], list[torch.Tensor]],
                      input_mean: torch.Tensor, input_var: torch.Tensor, tensors: dict[str, torch.Tensor]
                      ) -> fx.GraphModule:
    """Record ``run(input_mean, input_var, {name: tensor})`` (the moment pass) as an fx graph of ATen ops
    with inputs ``(input_mean, input_var, *tensors.values())``, common subexpressions eliminated, made
    device- and dtype-generic (module docstring). The pass must not read tensor values into Python
    (shape-derived values are fine: compute them under ``disable_proxy_modes_tracing``)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    names = list(tensors)

    def program(mean: torch.Tensor, var: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
        return run(mean, var, dict(zip(names, values, strict=True)))

    # One fake mode for the whole recording: without it, make_fx creates one per op to describe its output.
    context = torch._guards.TracingContext(torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True))
    with torch._guards.tracing(context):
        recorded = make_fx(program, tracing_mode="real")(input_mean, input_var, *tensors.values())
    _make_generic(recorded)
    # Common subexpressions: a folded layer's raw moments are computed for its statistics and again by the
    # rule that propagates past it; the recording repeats them, elimination keeps one.
    recorded = CSEPass()(recorded).graph_module
    _constants_as_buffers(recorded)
    _direct_calls(recorded)
    return recorded


def _make_generic(program: fx.GraphModule) -> None:
    """Factory ops take the input statistics' device; the inputs' dtype is made the recording's by
    :meth:`StatisticsProgram.run` (in Python, so that a program whose inputs have it holds no cast)."""
    graph = program.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        device = graph.call_function(getattr, (placeholders[0], "device"))
    for node in graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            raise RuntimeError(f"the recorded statistics pass draws random numbers ({node.target}): a rule must "
                               "create its random constants outside the recording (disable_proxy_modes_tracing)")
        if node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": device}
    graph.eliminate_dead_code()


def _constants_as_buffers(program: fx.GraphModule) -> None:
    for node in program.graph.nodes:
        if node.op == "get_attr":  # a lifted constant: a buffer (moves with the model), not in the state_dict
            name = str(node.target)
            value = getattr(program, name)
            if isinstance(value, torch.Tensor):
                delattr(program, name)
                program.register_buffer(name, value.detach().clone(), persistent=False)
    # Pickling re-traces the generated code with the recorded tracer class: make_fx's needs its tracing state.
    program.graph._tracer_cls = program._tracer_cls = None


def _direct_calls(program: fx.GraphModule) -> None:
    """The recorded custom ops become calls of submodules that run them directly (no op dispatch in eager mode,
    the compiler's own forms under torch.compile): every kernel-moments op a
    :class:`~graphnorm.rules.kernels.KernelMomentsCall` with a workspace of its own, every fused form
    (:mod:`graphnorm.rules.fusion`) a :class:`~graphnorm.rules.fusion.FusedCall`."""
    from .rules.fusion import FusedCall, form_of  # the rules package imports this module
    from .rules.kernels import KernelMomentsCall

    graph = program.graph
    counts = {"kernel_moments": 0, "fused": 0}
    for node in list(graph.nodes):
        if node.target is torch.ops.graphnorm.kernel_moments.default:
            weight, mean, var, groups = node.args
            call, args = KernelMomentsCall(groups), (weight, mean, var)
        elif node.target is torch.ops.graphnorm.fused.default:
            call, args = FusedCall(form_of(node.args[0])), tuple(node.args[1])
        else:
            continue
        kind = "kernel_moments" if isinstance(call, KernelMomentsCall) else "fused"
        name = f"{kind}_{counts[kind]}"
        counts[kind] += 1
        program.add_submodule(name, call)
        with graph.inserting_before(node):
            replacement = graph.call_module(name, args)
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()


@contextlib.contextmanager
def training_flag_reads() -> Iterator[set[int]]:
    """Collect the ids of the modules whose ``training`` flag is read inside the block.

    The moment pass of a model differs between training and eval only through rules whose canonical call reads
    a module's flag (dropout, noise, BatchNorm); when none is read, one recorded program serves both modes.
    Implemented with a data descriptor set on ``nn.Module`` for the duration of the block (modules keep their
    flag in their ``__dict__``, which the descriptor reads and writes)."""
    reads: set[int] = set()

    class _Spy:
        def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
            if module is None:
                return self
            reads.add(id(module))
            return module.__dict__["training"]

        def __set__(self, module: nn.Module, value: bool) -> None:
            module.__dict__["training"] = value

    nn.Module.training = _Spy()  # type: ignore[assignment]
    try:
        yield reads
    finally:
        del nn.Module.training


class StatisticsProgram(nn.Module):
    """The recorded statistics pass of a converted model (see the module docstring).

    ``eval_program`` is ``train_program`` itself when the pass does not depend on the mode.
    ``forward(*tensors)`` takes the parameters and buffers named by :attr:`names` (the converted graph passes
    them) and returns a flat list of statistics, two per site. ``input_mean``/``input_var`` are buffers: the
    input statistics the propagation starts from."""

    def __init__(self, train_program: fx.GraphModule, eval_program: fx.GraphModule, input_mean: torch.Tensor,
                 input_var: torch.Tensor, names: Sequence[str]):
        super().__init__()
        self.train_program = train_program
        self.eval_program = eval_program
        # Not in the state_dict: a checkpoint holds the model's weights; input statistics are given at conversion.
        self.register_buffer("input_mean", input_mean.detach().clone(), persistent=False)
        self.register_buffer("input_var", input_var.detach().clone(), persistent=False)
        self.names = list(names)
        self._dtypes = {name: buffer.dtype for name, buffer in self.named_buffers()}
        self._cache_key: tuple | None = None
        self._cached: list[torch.Tensor] | None = None

    def _apply(self, fn: Callable, recurse: bool = True) -> StatisticsProgram:
        """``.to(device)`` moves the program's buffers; ``.half()`` and friends do not lower their precision."""
        super()._apply(fn, recurse)
        for name, buffer in list(self.named_buffers()):
            if buffer.dtype != self._dtypes[name]:
                owner_name, _, attribute = name.rpartition(".")
                owner = self.get_submodule(owner_name)
                owner._buffers[attribute] = buffer.to(self._dtypes[name])
        self.invalidate()
        return self

    def invalidate(self) -> None:
        """Forget the cached eval statistics."""
        self._cache_key, self._cached = None, None

    def run(self, program: fx.GraphModule, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``program`` on the input statistics and ``tensors``, floating ones cast to the statistics' dtype
        (float32 or float64: parameters of any floating dtype), autocast off."""
        dtype = self.input_mean.dtype
        tensors = [t.to(dtype) if t.dtype in _FLOATING and t.dtype != dtype else t for t in tensors]
        with _autocast_off(self.input_mean.device):
            return program(self.input_mean, self.input_var, *tensors)

    def forward(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.training:
            return self.run(self.train_program, tensors)
        if torch.compiler.is_compiling() or any(is_fake(t) for t in tensors):
            with torch.no_grad():
                return self.run(self.eval_program, tensors)
        key = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device)
                    for t in (self.input_mean, self.input_var, *tensors))
        if self._cached is None or key != self._cache_key:
            with torch.no_grad():
                self._cached = self.run(self.eval_program, tensors)
            self._cache_key = key
        return self._cached

    def __getstate__(self) -> dict:
        """Copies and pickles do not carry the eval cache (it is recomputed on first use)."""
        state = dict(super().__getstate__())
        state["_cache_key"], state["_cached"] = None, None
        return state

    def extra_repr(self) -> str:
        shared = ", shared by eval" if self.eval_program is self.train_program else ""
        return f"{len(self.names)} inputs, {op_count(self.train_program)} ops in training{shared}"


def op_count(program: fx.GraphModule) -> int:
    """Number of ops a recorded program calls: ATen ops, kernel moments and fused forms, one each (a fused form
    runs a few ATen ops inside; :func:`dispatched_ops` counts those)."""
    return sum(node.op in ("call_function", "call_method", "call_module") and node.target is not operator.getitem
               and node.target is not getattr for node in program.graph.nodes)


def dispatched_ops(program: StatisticsProgram, tensors: Sequence[torch.Tensor]) -> dict[str, int]:
    """The ATen ops one training step's statistics dispatch (each a kernel launch on a GPU): ``program`` run on
    ``tensors`` in training mode, then backward through every output (views and other metadata-only ops
    included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    was_training = program.training
    program.train()
    try:
        with torch.enable_grad():
            with Count() as forward:
                outputs = program(*tensors)
            loss = sum(t.sum() for t in outputs if t.requires_grad)
            with Count() as backward:
                torch.autograd.grad(loss, [t for t in tensors if t.requires_grad], allow_unused=True)
    finally:
        program.train(was_training)
    return {"forward": forward.ops, "backward": backward.ops}


def folded_layer(layer: nn.Module, x: torch.Tensor, raw_mean: torch.Tensor, raw_var: torch.Tensor
                 ) -> torch.Tensor:
    """A Linear/Conv with a BatchNorm folded into its weight (reparam mode), given the channel moments
    ``(raw_mean, raw_var)`` of its output without bias: ``W_eff = gamma W/sigma``, ``b_eff = beta -
    gamma mu/sigma`` with ``(mu, sigma) = calibration(raw_mean, sqrt(raw_var + eps))``
    (:class:`~graphnorm.normalizers.NormalizedWeight`), computed by
    :func:`~graphnorm.normalizers.scaled_layer` (the scale on the weight or on the output, whichever is
    smaller). The layer's parametrizations compute the same from the statistics of the last refresh; this is
    the form the converted graph calls."""
    weight_parametrization = layer.parametrizations.weight[0]
    bias_parametrization = layer.parametrizations.bias[0]
    weight = layer.parametrizations.weight.original
    mu, sigma = weight_parametrization.state.normalizing(raw_mean, raw_var)
    scale, shift = weight_parametrization.scale(sigma), bias_parametrization.normalize(mu, sigma)
    return scaled_layer(layer, x, weight, scale, shift)
