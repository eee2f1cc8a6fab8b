"""The single table from the spellings of an op to its canonical op key.

PyTorch spells one op many ways: ``nn.ReLU()``, ``F.relu``, ``torch.relu``, ``x.relu()``; ``x + y`` is
``operator.add``, ``torch.add`` and ``x.add(y)``. Each spelling is registered here with its key and a
*canonicalizer*: a function with the spelling's own signature that returns ``(inputs, params)``, the
positional activations and the keyword-only static parameters of the rule for that key. A rule therefore
sees one call convention whatever the spelling.

Users extend the table with :func:`register_op` (their own module types, functions or method names).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

__all__ = ["OpSpelling", "canonical_call", "op_key", "register_op"]

Canonicalizer = Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass(frozen=True)
class OpSpelling:
    key: str
    canonicalize: Canonicalizer


_MODULES: dict[type, OpSpelling] = {}
_INSTANCES: dict[str, OpSpelling] = {}  # for modules that carry a ``graphnorm_op`` attribute
_FUNCTIONS: dict[Any, OpSpelling] = {}
_METHODS: dict[str, OpSpelling] = {}
_QUALIFIED: dict[str, OpSpelling] = {}  # "package.module.Name" of third-party classes and functions


def qualified_name(target: Any) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"


def _default_module_canonicalizer(module: nn.Module, *inputs: Any, **kwargs: Any):
    return inputs, {"module": module, **kwargs}


def _default_canonicalizer(*inputs: Any, **kwargs: Any):
    return inputs, kwargs


def register_op(target: type | Callable | str, key: str, canonicalize: Canonicalizer | None = None) -> None:
    """Map a spelling to the op key ``key``.

    ``target`` is an ``nn.Module`` subclass (its calls are canonicalized as ``(module, *args, **kwargs)``; the
    default passes ``module=`` to the rule), a function (``torch.*``, ``F.*`` or your own traced-through
    function, called as ``(*args, **kwargs)``), or a tensor method name (called as ``(self, *args)``).
    """
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register_op: a class target must be an nn.Module subclass, got {target!r}")
        _MODULES[target] = OpSpelling(key, canonicalize or _default_module_canonicalizer)
    elif isinstance(target, str):
        _METHODS[target] = OpSpelling(key, canonicalize or _default_canonicalizer)
    elif callable(target):
        _FUNCTIONS[target] = OpSpelling(key, canonicalize or _default_canonicalizer)
    else:
        raise TypeError(f"register_op: target must be a module type, a function or a method name, got {target!r}")


def register_qualified(name: str, key: str, canonicalize: Canonicalizer) -> None:
    """Map the class or function whose qualified name is ``name`` (``"package.module.Name"``) to ``key``,
    without importing its package (module classes registered so are traced as leaves)."""
    _QUALIFIED[name] = OpSpelling(key, canonicalize)


def registered_functions() -> list[Callable]:
    """The third-party functions registered by qualified name whose module is imported already."""
    found = []
    for name in _QUALIFIED:
        module_name, _, attribute = name.rpartition(".")
        function = getattr(sys.modules.get(module_name), attribute, None)
        if function is not None and not isinstance(function, type):
            found.append(function)
    return found


def is_registered_module(module: nn.Module) -> bool:
    """True when the module's own class (not a base class) has a spelling: the tracer keeps it a leaf."""
    cls = type(module)
    return cls in _MODULES or qualified_name(cls) in _QUALIFIED


def register_instance_op(key: str, canonicalize: Canonicalizer) -> None:
    """Give the op key ``key`` to every module instance whose ``graphnorm_op`` attribute is ``key``, whatever
    its type (used for layers that a rewrite parametrized in place)."""
    _INSTANCES[key] = OpSpelling(key, canonicalize)


def spelling_of(node: fx.Node, root: nn.Module) -> OpSpelling | None:
    """The registered spelling of a call node, or None."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        override = getattr(module, "graphnorm_op", None)
        if isinstance(override, str) and override in _INSTANCES:
            return _INSTANCES[override]
        for cls in type(module).__mro__:
            if cls in _MODULES:
                return _MODULES[cls]
            if qualified_name(cls) in _QUALIFIED:
                return _QUALIFIED[qualified_name(cls)]
        return None
    if node.op == "call_function":
        try:
            found = _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
        return found or _QUALIFIED.get(qualified_name(node.target))
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def op_key(node: fx.Node, root: nn.Module) -> str | None:
    """Canonical op key of ``node`` ("conv", "relu", "add", ...), structural keys for graph plumbing."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    spelling = spelling_of(node, root)
    return spelling.key if spelling else None


def canonical_call(node: fx.Node, root: nn.Module, args: tuple, kwargs: dict) -> tuple[str, tuple, dict]:
    """``(key, inputs, params)`` for a call node whose arguments have been evaluated to ``args``/``kwargs``."""
    spelling = spelling_of(node, root)
    assert spelling is not None, f"no spelling for {node.format_node()}"
    if node.op == "call_module":
        inputs, params = spelling.canonicalize(root.get_submodule(node.target), *args, **kwargs)
    else:
        inputs, params = spelling.canonicalize(*args, **kwargs)
    return spelling.key, tuple(inputs), params


def target_name(node: fx.Node, root: nn.Module) -> str:
    """A readable name of what a node calls (for error messages and reports)."""
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    return f"{module}.{name}" if module and module != "builtins" else name


# ------------------------------------------------------------------------------------------------------------
# The table. Each block registers the module form, functional forms, torch.* and method spellings of one op.
# ------------------------------------------------------------------------------------------------------------


def _unary(key: str, module_types: tuple[type, ...], functions: tuple, methods: tuple[str, ...] = (),
           module_params: Callable[[nn.Module], dict] | None = None,
           function: Canonicalizer | None = None) -> None:
    """Register an elementwise op whose rule takes one input and optional static parameters."""
    def from_module(module, x, *_, **__):
        return (x,), (module_params(module) if module_params else {})

    for module_type in module_types:
        register_op(module_type, key, from_module)
    for fn in functions:
        register_op(fn, key, function or (lambda x, *_, **__: ((x,), {})))
    for method in methods:
        register_op(method, key, function or (lambda x, *_, **__: ((x,), {})))


_unary("relu", (nn.ReLU,), (F.relu, torch.relu, F.relu_, torch.relu_), ("relu", "relu_"))
_unary("relu6", (nn.ReLU6,), (F.relu6,))
_unary("leaky_relu", (nn.LeakyReLU,), (F.leaky_relu,),
       module_params=lambda m: {"negative_slope": m.negative_slope},
       function=lambda x, negative_slope=0.01, *_, **__: ((x,), {"negative_slope": negative_slope}))
_unary("hardtanh", (nn.Hardtanh,), (F.hardtanh,),
       module_params=lambda m: {"min_val": m.min_val, "max_val": m.max_val},
       function=lambda x, min_val=-1.0, max_val=1.0, *_, **__: ((x,), {"min_val": min_val, "max_val": max_val}))
_unary("sigmoid", (nn.Sigmoid,), (F.sigmoid, torch.sigmoid), ("sigmoid",))
_unary("tanh", (nn.Tanh,), (F.tanh, torch.tanh), ("tanh",))
_unary("gelu", (nn.GELU,), (F.gelu,), module_params=lambda m: {"approximate": m.approximate},
       function=lambda x, approximate="none": ((x,), {"approximate": approximate}))
_unary("silu", (nn.SiLU,), (F.silu,))
_unary("elu", (nn.ELU,), (F.elu,), module_params=lambda m: {"alpha": m.alpha},
       function=lambda x, alpha=1.0, *_, **__: ((x,), {"alpha": alpha}))
_unary("softplus", (nn.Softplus,), (F.softplus,),
       module_params=lambda m: {"beta": m.beta, "threshold": m.threshold},
       function=lambda x, beta=1.0, threshold=20.0: ((x,), {"beta": beta, "threshold": threshold}))
_unary("mish", (nn.Mish,), (F.mish,))
_unary("hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,))
_unary("hardswish", (nn.Hardswish,), (F.hardswish,))
_unary("identity", (nn.Identity,), (), ("contiguous", "clone"))


def _clamp(x, min=None, max=None):
    return (x,), {"min_val": min, "max_val": max}


for _spelling in (torch.clamp, torch.clip, "clamp", "clip"):
    register_op(_spelling, "clamp", _clamp)


# -- affine ----------------------------------------------------------------------------------------------------
def _linear_module(m: nn.Linear, x):
    return (x,), {"weight": m.weight, "bias": m.bias}


register_op(nn.Linear, "linear", _linear_module)
register_op(F.linear, "linear", lambda x, weight, bias=None: ((x,), {"weight": weight, "bias": bias}))


def _conv_module(m: nn.modules.conv._ConvNd, x):
    return (x,), {"weight": m.weight, "bias": m.bias, "stride": m.stride, "padding": m.padding,
                  "dilation": m.dilation, "groups": m.groups, "padding_mode": m.padding_mode}


def _conv_function(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return (x,), {"weight": weight, "bias": bias, "stride": stride, "padding": padding,
                  "dilation": dilation, "groups": groups, "padding_mode": "zeros"}


for _module, _function in ((nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d)):
    register_op(_module, "conv", _conv_module)
    register_op(_function, "conv", _conv_function)


def _conv_transpose_module(m: nn.modules.conv._ConvTransposeNd, x, output_size=None):
    if output_size is not None:
        raise NotImplementedError("ConvTranspose with output_size is not supported by the moment rule")
    return (x,), {"weight": m.weight, "bias": m.bias, "stride": m.stride, "padding": m.padding,
                  "output_padding": m.output_padding, "dilation": m.dilation, "groups": m.groups}


def _conv_transpose_function(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return (x,), {"weight": weight, "bias": bias, "stride": stride, "padding": padding,
                  "output_padding": output_padding, "dilation": dilation, "groups": groups}


for _module, _function in ((nn.ConvTranspose1d, F.conv_transpose1d), (nn.ConvTranspose2d, F.conv_transpose2d),
                           (nn.ConvTranspose3d, F.conv_transpose3d)):
    register_op(_module, "conv_transpose", _conv_transpose_module)
    register_op(_function, "conv_transpose", _conv_transpose_function)


def _batch_norm_module(m: nn.modules.batchnorm._NormBase, x):
    uses_batch_stats = m.training or m.running_mean is None
    return (x,), {"running_mean": m.running_mean, "running_var": m.running_var, "weight": m.weight,
                  "bias": m.bias, "training": uses_batch_stats, "eps": m.eps}


def _batch_norm_function(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                         eps=1e-5, *_, **__):
    return (x,), {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias,
                  "training": bool(training) or running_mean is None, "eps": eps}


register_op(nn.modules.batchnorm._BatchNorm, "batch_norm", _batch_norm_module)
def _torch_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, *_, **__):
    """``torch.batch_norm`` orders its arguments differently from ``F.batch_norm``."""
    return _batch_norm_function(x, running_mean, running_var, weight, bias, training, momentum, eps)


register_op(F.batch_norm, "batch_norm", _batch_norm_function)
register_op(torch.batch_norm, "batch_norm", _torch_batch_norm)


# -- pooling ---------------------------------------------------------------------------------------------------
def _max_pool_module(m, x):
    return (x,), {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                  "dilation": m.dilation, "ceil_mode": m.ceil_mode}


def _max_pool_function(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if return_indices:
        raise NotImplementedError("max pooling with return_indices=True has no moment rule")
    return (x,), {"kernel_size": kernel_size, "stride": stride or kernel_size, "padding": padding,
                  "dilation": dilation, "ceil_mode": ceil_mode}


for _module, _function in ((nn.MaxPool1d, F.max_pool1d), (nn.MaxPool2d, F.max_pool2d)):
    register_op(_module, "max_pool", _max_pool_module)
    register_op(_function, "max_pool", _max_pool_function)


def _avg_pool_module(m, x):
    return (x,), {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                  "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad,
                  "divisor_override": getattr(m, "divisor_override", None)}


def _avg_pool_function(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                       divisor_override=None):
    return (x,), {"kernel_size": kernel_size, "stride": stride or kernel_size, "padding": padding,
                  "ceil_mode": ceil_mode, "count_include_pad": count_include_pad,
                  "divisor_override": divisor_override}


for _module, _function in ((nn.AvgPool1d, F.avg_pool1d), (nn.AvgPool2d, F.avg_pool2d)):
    register_op(_module, "avg_pool", _avg_pool_module)
    register_op(_function, "avg_pool", _avg_pool_function)

for _module, _function in ((nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d),
                           (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)):
    register_op(_module, "adaptive_avg_pool", lambda m, x: ((x,), {"output_size": m.output_size}))
    register_op(_function, "adaptive_avg_pool", lambda x, output_size: ((x,), {"output_size": output_size}))


# -- dropout ---------------------------------------------------------------------------------------------------
register_op(nn.Dropout, "dropout", lambda m, x: ((x,), {"p": m.p, "training": m.training}))
register_op(F.dropout, "dropout",
            lambda x, p=0.5, training=True, inplace=False: ((x,), {"p": p, "training": training}))


# -- shape plumbing --------------------------------------------------------------------------------------------
def _flatten(x, start_dim=0, end_dim=-1):
    return (x,), {"start_dim": start_dim, "end_dim": end_dim}


register_op(nn.Flatten, "flatten", lambda m, x: ((x,), {"start_dim": m.start_dim, "end_dim": m.end_dim}))
register_op(torch.flatten, "flatten", _flatten)
register_op("flatten", "flatten", _flatten)


def _reshape_method(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return (x,), {"shape": tuple(shape)}


register_op("view", "reshape", _reshape_method)
register_op("reshape", "reshape", _reshape_method)
register_op(torch.reshape, "reshape", lambda x, shape: ((x,), {"shape": tuple(shape)}))
for _spelling in ("squeeze", "unsqueeze", torch.squeeze, torch.unsqueeze):  # the rule reads the output shape
    register_op(_spelling, "reshape", lambda x, *_, **__: ((x,), {}))


# -- arithmetic ------------------------------------------------------------------------------------------------
def _binary(a, b, alpha=1, **_):
    return (a, b), {"alpha": alpha}


def _binary_plain(a, b, **_):
    return (a, b), {}


for _spelling in (operator.add, operator.iadd, torch.add, "add", "add_"):
    register_op(_spelling, "add", _binary)
for _spelling in (operator.sub, operator.isub, torch.sub, "sub", "sub_"):
    register_op(_spelling, "sub", _binary)
for _spelling in (operator.mul, operator.imul, torch.mul, "mul", "mul_"):
    register_op(_spelling, "mul", _binary_plain)
for _spelling in (operator.truediv, operator.itruediv, torch.div, "div", "div_"):
    register_op(_spelling, "div", _binary_plain)
for _spelling in (operator.neg, torch.neg, "neg"):
    register_op(_spelling, "neg", lambda x: ((x,), {}))


def _cat(tensors, dim=0, **_):
    return tuple(tensors), {"dim": dim}


for _spelling in (torch.cat, torch.concat, torch.concatenate):
    register_op(_spelling, "cat", _cat)


# -- layout: selection, multi-output, permutation, broadcasting, padding, resampling ----------------------------
def _getitem(x, index):
    return (x,), {"index": index}


register_op(operator.getitem, "getitem", _getitem)


def _split(x, split_size_or_sections, dim=0):
    if isinstance(split_size_or_sections, int):
        return (x,), {"sections": split_size_or_sections, "dim": dim}
    return (x,), {"sections": list(split_size_or_sections), "dim": dim}


def _batched_rank(x) -> int:
    """Rank of the batched tensor whose one-sample Moments (or tensor) ``x`` is."""
    return len(x.shape) + 1


def _chunk(x, chunks, dim=0):
    # torch.chunk's sizes: ceil(n / chunks) each, the last smaller (possibly fewer chunks)
    size = x.shape[dim % _batched_rank(x) - 1]
    return (x,), {"sections": -(-size // chunks), "dim": dim}


for _spelling in (torch.split, "split", "split_with_sizes"):
    register_op(_spelling, "split", _split)
for _spelling in (torch.chunk, "chunk"):
    register_op(_spelling, "split", _chunk)
for _spelling in (torch.unbind, "unbind"):
    register_op(_spelling, "split", lambda x, dim=0: ((x,), {"sections": None, "dim": dim}))


def _sample_permutation(dims: tuple[int, ...]) -> tuple[int, ...]:
    """A permutation of a batched tensor's dims that keeps the batch dim first, as one of the sample's dims."""
    rank = len(dims)
    dims = tuple(d % rank for d in dims)
    if dims[0] != 0:
        raise NotImplementedError("the permutation moves the batch dim")
    return tuple(d - 1 for d in dims[1:])


def _permute(x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = tuple(dims[0])
    return (x,), {"dims": _sample_permutation(tuple(dims))}


def _transpose(x, dim0, dim1):
    order = list(range(_batched_rank(x)))
    order[dim0], order[dim1] = order[dim1], order[dim0]
    return (x,), {"dims": _sample_permutation(tuple(order))}


def _movedim(x, source, destination):
    rank = _batched_rank(x)
    order = list(range(rank))
    source, destination = source % rank, destination % rank
    order.insert(destination, order.pop(source))
    return (x,), {"dims": _sample_permutation(tuple(order))}


for _spelling in (torch.permute, "permute"):
    register_op(_spelling, "permute", _permute)
for _spelling in (torch.transpose, "transpose", torch.swapaxes, "swapaxes"):
    register_op(_spelling, "permute", _transpose)
for _spelling in (torch.movedim, "movedim"):
    register_op(_spelling, "permute", _movedim)
for _spelling in ("expand", "expand_as", torch.broadcast_to, "broadcast_to"):  # the rule reads the output shape
    register_op(_spelling, "expand", lambda x, *_, **__: ((x,), {}))
register_op("reshape_as", "reshape", lambda x, *_, **__: ((x,), {}))
register_op("view_as", "reshape", lambda x, *_, **__: ((x,), {}))
register_op(F.pad, "pad",
            lambda x, pad, mode="constant", value=None: ((x,), {"pad": pad, "mode": mode, "value": value}))
for _module in (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d):
    register_op(_module, "pad", lambda m, x: ((x,), {"pad": m.padding, "mode": "constant", "value": m.value}))
for _module, _mode in ((nn.ReflectionPad1d, "reflect"), (nn.ReflectionPad2d, "reflect"),
                       (nn.ReplicationPad1d, "replicate"), (nn.ReplicationPad2d, "replicate")):
    register_op(_module, "pad", lambda m, x, mode=_mode: ((x,), {"pad": m.padding, "mode": mode}))


def _interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None, *_, **__):
    return (x,), {"mode": mode, "align_corners": align_corners}


register_op(F.interpolate, "interpolate", _interpolate)
register_op(nn.Upsample, "interpolate", lambda m, x: ((x,), {"mode": m.mode, "align_corners": m.align_corners}))
register_op(nn.UpsamplingNearest2d, "interpolate", lambda m, x: ((x,), {"mode": "nearest"}))
register_op(nn.UpsamplingBilinear2d, "interpolate", lambda m, x: ((x,), {"mode": "bilinear", "align_corners": True}))
register_op(torch.stack, "stack", lambda tensors, dim=0, **_: (tuple(tensors), {"dim": dim}))
register_op(F.unfold, "unfold", lambda x, kernel_size, dilation=1, padding=0, stride=1: (
    (x,), {"kernel_size": kernel_size, "dilation": dilation, "padding": padding, "stride": stride}))
register_op(nn.Unfold, "unfold", lambda m, x: ((x,), {"kernel_size": m.kernel_size, "dilation": m.dilation,
                                                        "padding": m.padding, "stride": m.stride}))
register_op(F.fold, "fold", lambda x, output_size, kernel_size, dilation=1, padding=0, stride=1: (
    (x,), {"output_size": output_size, "kernel_size": kernel_size, "dilation": dilation, "padding": padding,
           "stride": stride}))
register_op(nn.Fold, "fold", lambda m, x: ((x,), {"output_size": m.output_size, "kernel_size": m.kernel_size,
                                                    "dilation": m.dilation, "padding": m.padding, "stride": m.stride}))


# -- reductions and products -------------------------------------------------------------------------------------
def _reduction(x, dim=None, keepdim=False, *, dtype=None):
    return (x,), {"dim": dim, "keepdim": keepdim}


for _spelling in (torch.mean, "mean"):
    register_op(_spelling, "mean", _reduction)
for _spelling in (torch.sum, "sum"):
    register_op(_spelling, "sum", _reduction)
for _spelling in (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm"):
    register_op(_spelling, "matmul", _binary_plain)


# -- per-sample normalizations ---------------------------------------------------------------------------------
register_op(nn.LayerNorm, "layer_norm", lambda m, x: ((x,), {"normalized_shape": m.normalized_shape, "weight": m.weight,
                                                              "bias": m.bias, "eps": m.eps}))
register_op(F.layer_norm, "layer_norm", lambda x, normalized_shape, weight=None, bias=None, eps=1e-5: (
    (x,), {"normalized_shape": normalized_shape, "weight": weight, "bias": bias, "eps": eps}))
register_op(nn.GroupNorm, "group_norm", lambda m, x: ((x,), {"num_groups": m.num_groups, "weight": m.weight,
                                                              "bias": m.bias, "eps": m.eps}))
register_op(F.group_norm, "group_norm", lambda x, num_groups, weight=None, bias=None, eps=1e-5: (
    (x,), {"num_groups": num_groups, "weight": weight, "bias": bias, "eps": eps}))


def _instance_norm_module(m, x):
    return (x,), {"running_mean": m.running_mean, "running_var": m.running_var, "weight": m.weight,
                  "bias": m.bias, "use_input_stats": m.training or not m.track_running_stats, "eps": m.eps}


def _instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5):
    return (x,), {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias,
                  "use_input_stats": use_input_stats, "eps": eps}


for _module in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_op(_module, "instance_norm", _instance_norm_module)
register_op(F.instance_norm, "instance_norm", _instance_norm)


# -- stochastic depth (torchvision, timm): registered by qualified name, so neither library is imported here ---
def _drop_path_function(x, p=0.0, mode="row", training=True, *_, rescaled=True, **__):
    if not rescaled and training and p > 0:
        raise NotImplementedError("drop path without rescaling by 1/(1-p) has no closed-form rule")
    return (x,), {"p": p, "training": training}


register_qualified("torchvision.ops.stochastic_depth.StochasticDepth", "drop_path",
                   lambda m, x: ((x,), {"p": m.p, "training": m.training}))
register_qualified("torchvision.ops.stochastic_depth.stochastic_depth", "drop_path", _drop_path_function)
register_qualified("timm.layers.drop.DropPath", "drop_path",
                   lambda m, x: ((x,), {"p": m.drop_prob, "training": m.training}))
register_qualified("timm.layers.drop.drop_path", "drop_path",
                   lambda x, drop_prob=0.0, training=False, scale_by_keep=True: _drop_path_function(
                       x, drop_prob, training=training, rescaled=scale_by_keep))
from . import aten_spellings as _aten_spellings  # noqa: E402,F401  (registers the ATen spellings)
