"""ATen spellings of the ops in :mod:`graphnorm.ops`, for graphs captured by ``torch.export``.

A graph from ``torch.export`` calls ATen operator overloads (``torch.ops.aten.conv2d.default``,
``aten.add_.Tensor``, ``aten.mean.dim``, ...) instead of ``torch.*``/``F.*`` functions, modules and methods. Each
overload is registered here in the same table, under the same op key, mostly by borrowing the canonicalizer of
the torch function whose positional signature it shares; so a rule and a rewrite serve both capture paths.
Overloads that return several tensors (``aten._native_batch_norm_legit_no_training``,
``aten.max_pool2d_with_indices``) are rewritten to their one-output forms by :mod:`graphnorm.exported` before
the table is consulted.

Covered: the training IR that ``torch.export.export`` produces (``aten.conv2d``, ``aten.linear``,
``aten.batch_norm``, in-place activations) and the core ATen IR after ``run_decompositions()``
(``aten.convolution``, ``aten.addmm``, ``aten._native_batch_norm_legit_no_training``, ``aten.view``).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .ops import _FUNCTIONS, register_op

aten = torch.ops.aten

__all__: list[str] = []


def _same_as(existing, *overloads) -> None:
    """Register ``overloads`` with the key and canonicalizer of the registered torch spelling ``existing``."""
    spelling = _FUNCTIONS[existing]
    for overload in overloads:
        register_op(overload, spelling.key, spelling.canonicalize)


def _overloads(*names: str):
    """The ATen overloads ``"relu.default"``, ... that exist in this torch build."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        found_packet = getattr(aten, packet, None)
        if found_packet is not None and overload in found_packet.overloads():
            found.append(getattr(found_packet, overload))
    return found


# -- elementwise: the aten overload takes the torch function's leading positional arguments ----------------------
for _torch_function, _names in (
    (F.relu, ("relu.default", "relu_.default")),
    (torch.sigmoid, ("sigmoid.default", "sigmoid_.default")),
    (torch.tanh, ("tanh.default", "tanh_.default")),
    (F.gelu, ("gelu.default", "gelu_.default")),
    (F.silu, ("silu.default", "silu_.default")),
    (F.hardswish, ("hardswish.default", "hardswish_.default")),
    (F.hardsigmoid, ("hardsigmoid.default", "hardsigmoid_.default")),
    (F.hardtanh, ("hardtanh.default", "hardtanh_.default")),
    (F.leaky_relu, ("leaky_relu.default", "leaky_relu_.default")),
    (F.softplus, ("softplus.default",)),
    (F.mish, ("mish.default", "mish_.default")),
    (torch.clamp, ("clamp.default", "clamp.Tensor")),
    (operator.add, ("add.Tensor", "add_.Tensor", "add.Scalar", "add_.Scalar")),
    (operator.sub, ("sub.Tensor", "sub_.Tensor", "sub.Scalar")),
    (operator.mul, ("mul.Tensor", "mul_.Tensor", "mul.Scalar", "mul_.Scalar")),
    (operator.truediv, ("div.Tensor", "div_.Tensor", "div.Scalar")),
    (operator.neg, ("neg.default",)),
    (torch.cat, ("cat.default",)),
    (torch.stack, ("stack.default",)),
    (F.conv1d, ("conv1d.default",)),
    (F.conv2d, ("conv2d.default",)),
    (F.conv3d, ("conv3d.default",)),
    (F.conv_transpose1d, ("conv_transpose1d.default",)),
    (F.conv_transpose2d, ("conv_transpose2d.input",)),
    (F.conv_transpose3d, ("conv_transpose3d.input",)),
    (F.linear, ("linear.default",)),
    (torch.batch_norm, ("batch_norm.default",)),
    (F.max_pool1d, ("max_pool1d.default",)),
    (F.max_pool2d, ("max_pool2d.default",)),
    (F.avg_pool1d, ("avg_pool1d.default",)),
    (F.avg_pool2d, ("avg_pool2d.default",)),
    (F.adaptive_avg_pool1d, ("adaptive_avg_pool1d.default",)),
    (F.adaptive_avg_pool2d, ("adaptive_avg_pool2d.default", "_adaptive_avg_pool2d.default")),
    (F.dropout, ("dropout.default",)),
    (torch.flatten, ("flatten.using_ints",)),
    (torch.split, ("split.Tensor", "split_with_sizes.default")),
    (torch.chunk, ("chunk.default",)),
    (torch.unbind, ("unbind.int",)),
    (torch.permute, ("permute.default",)),
    (torch.transpose, ("transpose.int",)),
    (torch.movedim, ("movedim.int",)),
    (F.pad, ("pad.default",)),
    (torch.mean, ("mean.dim", "mean.default")),
    (torch.sum, ("sum.dim_IntList", "sum.default")),
    (torch.matmul, ("matmul.default", "bmm.default", "mm.default")),
    (torch.squeeze, ("squeeze.default", "squeeze.dim", "squeeze.dims", "unsqueeze.default")),
):
    _same_as(_torch_function, *_overloads(*_names))

def _rsub(x, other, alpha=1):
    """``other - alpha * x``."""
    return (other, x), {"alpha": alpha}


for _overload in _overloads("rsub.Scalar", "rsub.Tensor"):
    register_op(_overload, "sub", _rsub)
for _overload in _overloads("im2col.default"):
    register_op(_overload, "unfold", lambda x, kernel_size, dilation, padding, stride: (
        (x,), {"kernel_size": kernel_size, "dilation": dilation, "padding": padding, "stride": stride}))
for _overload in _overloads("col2im.default"):
    register_op(_overload, "fold", lambda x, output_size, kernel_size, dilation, padding, stride: (
        (x,), {"output_size": output_size, "kernel_size": kernel_size, "dilation": dilation, "padding": padding,
               "stride": stride}))
for _overload in _overloads("view.default", "reshape.default", "_unsafe_view.default"):
    register_op(_overload, "reshape", lambda x, shape: ((x,), {"shape": tuple(shape)}))
for _overload in _overloads("expand.default", "expand_copy.default", "expand_as.default"):
    register_op(_overload, "expand", lambda x, *_, **__: ((x,), {}))
for _overload in _overloads("clone.default", "contiguous.default", "alias.default", "detach.default",
                            "_to_copy.default", "lift_fresh_copy.default"):
    register_op(_overload, "identity", lambda x, *_, **__: ((x,), {}))


# -- overloads whose signature differs from every torch spelling ------------------------------------------------
def _convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """``aten.convolution`` (core ATen): a convolution; its transposed form is declined (the sampled fallback
    then covers it) because one overload cannot carry two op keys."""
    if transposed:
        raise NotImplementedError("aten.convolution with transposed=True has no rule under the 'conv' key")
    return (x,), {"weight": weight, "bias": bias, "stride": stride, "padding": padding, "dilation": dilation,
                  "groups": groups, "padding_mode": "zeros"}


for _overload in _overloads("convolution.default"):
    register_op(_overload, "conv", _convolution)


def _addmm(bias, x, weight_t, *, beta=1, alpha=1):
    """``beta * bias + alpha * x @ weight_t``: a Linear layer once ``weight_t`` (computed from the weight in the
    graph, a constant of the pass) is transposed back."""
    if beta != 1 or alpha != 1:
        raise NotImplementedError("addmm with beta or alpha other than 1")
    return (x,), {"weight": weight_t.T, "bias": bias}


for _overload in _overloads("addmm.default"):
    register_op(_overload, "linear", _addmm)


def _clamp_min(x, min):
    return (x,), {"min_val": min, "max_val": None}


def _clamp_max(x, max):
    return (x,), {"min_val": None, "max_val": max}


for _overload in _overloads("clamp_min.default", "clamp_min_.default"):
    register_op(_overload, "clamp", _clamp_min)
for _overload in _overloads("clamp_max.default", "clamp_max_.default"):
    register_op(_overload, "clamp", _clamp_max)


def _elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
    if scale != 1 or input_scale != 1:
        raise NotImplementedError("elu with scale or input_scale other than 1 (selu) has no closed-form rule")
    return (x,), {"alpha": alpha}


for _overload in _overloads("elu.default", "elu_.default"):
    register_op(_overload, "elu", _elu)


def _batch_norm_no_training(x, weight, bias, running_mean, running_var, momentum, eps):
    return (x,), {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias,
                  "training": False, "eps": eps}


for _overload in _overloads("_native_batch_norm_legit_no_training.default"):
    register_op(_overload, "batch_norm", _batch_norm_no_training)


_WHOLE_DIM = 2**63 - 1  # torch.export writes x[:, :c] as slice(x, 0, 0, 2**63 - 1) then slice(x, 1, 0, c)


def _slice(x, dim=0, start=None, end=None, step=1):
    rank = len(x.shape) + 1
    whole = start in (None, 0) and (end is None or end >= _WHOLE_DIM) and step in (None, 1)
    return (x,), {"index": (slice(None),) * (dim % rank) + (slice(None) if whole else slice(start, end, step),)}


def _select(x, dim, index):
    rank = len(x.shape) + 1
    return (x,), {"index": (slice(None),) * (dim % rank) + (index,)}


for _overload in _overloads("slice.Tensor"):
    register_op(_overload, "getitem", _slice)
for _overload in _overloads("select.int"):
    register_op(_overload, "getitem", _select)


def _constant_pad(x, pad, value=0.0):
    return (x,), {"pad": pad, "mode": "constant", "value": value}


for _overload in _overloads("constant_pad_nd.default"):
    register_op(_overload, "pad", _constant_pad)
for _mode, _names in (("reflect", ("reflection_pad1d.default", "reflection_pad2d.default")),
                      ("replicate", ("replication_pad1d.default", "replication_pad2d.default"))):
    for _overload in _overloads(*_names):
        register_op(_overload, "pad", lambda x, padding, mode=_mode: ((x,), {"pad": padding, "mode": mode}))


def _upsample(mode: str, has_align_corners: bool):
    def canonicalize(x, output_size, *rest, **_):
        align_corners = rest[0] if has_align_corners and rest else None
        return (x,), {"mode": mode, "align_corners": align_corners}
    return canonicalize


for _mode, _align, _names in (
    ("nearest", False, ("upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest2d.default")),
    ("bilinear", True, ("upsample_bilinear2d.vec", "upsample_bilinear2d.default")),
    ("linear", True, ("upsample_linear1d.vec",)),
    ("bicubic", True, ("upsample_bicubic2d.vec", "upsample_bicubic2d.default")),
):
    for _overload in _overloads(*_names):
        register_op(_overload, "interpolate", _upsample(_mode, _align))


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return (x,), {"normalized_shape": normalized_shape, "weight": weight, "bias": bias, "eps": eps}


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return (x,), {"num_groups": num_groups, "weight": weight, "bias": bias, "eps": eps}


def _instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    return (x,), {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias,
                  "use_input_stats": use_input_stats, "eps": eps}


for _overload in _overloads("layer_norm.default"):
    register_op(_overload, "layer_norm", _layer_norm)
for _overload in _overloads("group_norm.default"):
    register_op(_overload, "group_norm", _group_norm)
for _overload in _overloads("instance_norm.default"):
    register_op(_overload, "instance_norm", _instance_norm)
