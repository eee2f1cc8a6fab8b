"""Moment rules of graph plumbing and arithmetic: identity, dropout, flatten/reshape, add/sub/mul/div/neg
(with constants or between two random tensors), concatenation.

Between two random tensors the rules assume independence (``Var[x + y] = Var[x] + Var[y]``;
``Var[x y] = (v_x + m_x^2)(v_y + m_y^2) - m_x^2 m_y^2``). The same node on both sides (``x + x``, ``x * x``)
is handled exactly instead (Gaussian fourth moment for ``x * x``). Residual branches are correlated with
their skip; that covariance is neglected (MATH.md section 6).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import torch

from ..errors import RuleError
from ..moments import Moments
from . import moment_rule
from .channel_correlation import affine_correlation, concatenated_correlation, gated_correlation, sum_correlation
from .fusion import FusedForm, fused, plain
from .neighbours import add_templates, product_template, template_of, template_radius
from .skewness import third_through_affine

Operand = Moments | torch.Tensor | numbers.Number


@moment_rule("identity")
def identity(x: Moments, **_) -> Moments:
    """Identity (``nn.Identity``, ``contiguous``, ``clone``): moments unchanged."""
    return x


@moment_rule("drop_path")
def drop_path(x: Moments, *, p: float = 0.0, training: bool = False, **_) -> Moments:
    """Stochastic depth (torchvision ``stochastic_depth``, timm ``DropPath``): ``y = x b/(1-p)`` with one
    Bernoulli(1-p) ``b`` per sample (or per batch). Each unit's marginal is dropout's, so its moments are
    dropout's: exact (the mask's correlation across units of a sample does not change per-unit moments)."""
    return dropout(x, p=p, training=training)


@moment_rule("dropout")
def dropout(x: Moments, *, p: float = 0.5, training: bool = True, **_) -> Moments:
    """Inverted dropout with drop rate r. Eval: identity. Train: ``y = x b/(1-r)``, b ~ Bernoulli(1-r)
    independent of x, so mean ``m`` and var ``(v + m^2)/(1-r) - m^2`` (exact)."""
    if not training or p == 0:
        return x
    if p >= 1:
        return Moments(torch.zeros_like(x.loc), torch.zeros_like(x.spread), x.shape)
    second = (x.spread + x.loc.square()) / (1 - p)
    return Moments(x.loc, second - x.loc.square(), x.shape)


def _reshaped(x: Moments, out_shape: tuple[int, ...]) -> Moments:
    """Any reshape that keeps the batch dim: move unit maps to the new shape (channel moments are
    broadcast over positions first), then dim 1 of the new shape is the channel."""
    if tuple(out_shape) == x.shape:
        return x
    if x.positions * x.channels != _numel(out_shape):
        raise RuleError(f"reshape from {x.shape} to {tuple(out_shape)} mixes the batch dim; keep dim 0 as batch")
    mean = x.unit_mean.reshape(out_shape)
    var = x.unit_var.reshape(out_shape)
    return Moments.per_unit(mean, var) if len(out_shape) > 1 else Moments.per_channel(mean, var, tuple(out_shape))


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@moment_rule("flatten")
def flatten(x: Moments, *, out_shape: tuple[int, ...], **_) -> Moments:
    """Flatten (``start_dim >= 1``): each unit keeps its moments; flattening ``(C, H, W)`` to features repeats
    each channel's moments over its ``H*W`` positions."""
    return _reshaped(x, out_shape)


@moment_rule("reshape")
def reshape(x: Moments, *, out_shape: tuple[int, ...], **_) -> Moments:
    """``view``/``reshape`` that keeps the batch dim: units keep their moments (see :func:`flatten`)."""
    return _reshaped(x, out_shape)


def constant_of_one_sample(value: torch.Tensor | numbers.Number, x: Moments) -> torch.Tensor:
    """A constant operand in ``x``'s dtype and device, without its batch dim if it has one (of size 1)."""
    tensor = torch.as_tensor(value, dtype=x.loc.dtype, device=x.loc.device)
    if tensor.dim() > len(x.shape):
        if tensor.dim() > len(x.shape) + 1 or tensor.shape[0] != 1:
            raise RuleError(f"a constant of shape {tuple(tensor.shape)} varies along the batch dim")
        tensor = tensor[0]
    return tensor


def _per_sample_constant(value: torch.Tensor | numbers.Number, x: Moments) -> torch.Tensor:
    """A constant operand as a scalar or a tensor with one dim per activation dim (batch dim dropped)."""
    tensor = constant_of_one_sample(value, x)
    if tensor.dim() == 0:
        return tensor
    return tensor.reshape((1,) * (len(x.shape) - tensor.dim()) + tuple(tensor.shape))


def _varies_within_channel(constant: torch.Tensor) -> bool:
    return constant.dim() > 1 and any(size != 1 for size in constant.shape[1:])


def _channel_form(constant: torch.Tensor) -> torch.Tensor:
    return constant if constant.dim() == 0 else constant.reshape(constant.shape[0])


def _result(mean: torch.Tensor, var: torch.Tensor, out_shape, per_unit: bool,
            third: torch.Tensor | None = None) -> Moments:
    shape = tuple(out_shape)
    stored = shape if per_unit and len(shape) > 1 else shape[:1]
    return Moments(_expanded(mean, stored), _expanded(var, stored), shape,
                   third=None if third is None else _expanded(third, stored))


def _expanded(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``values`` broadcast to ``shape`` (no op when it has that shape already)."""
    return values if tuple(values.shape) == shape else values.expand(shape)


def _affine_constant(x: Moments, scale, shift, out_shape) -> Moments:
    """``scale * x + shift`` with constant scale and shift (numbers or tensors broadcastable to x)."""
    unit = _is_number(scale, 1)
    no_shift = _is_number(shift, 0)
    scale, shift = (_per_sample_constant(c, x) for c in (scale, shift))
    varies = _varies_within_channel(scale)
    per_unit = x.is_per_unit or varies or _varies_within_channel(shift)
    if per_unit:
        mean, var, third = x.unit_mean, x.unit_var, x.unit_third
    else:
        scale, shift = _channel_form(scale), _channel_form(shift)
        mean, var, third = x.loc, x.spread, x.third
    if not unit:  # (no op recorded for a scale of 1 or a shift of 0)
        mean, var = mean * scale, var * scale * scale
    if not no_shift:
        mean = mean + shift
    out = _result(mean, var, out_shape, per_unit, third=third_through_affine(third, scale))
    # a per-channel scale keeps the correlation between positions
    if varies or out.shape != x.shape:
        return out
    return replace(out, neighbours=x.neighbours, channel_correlation=affine_correlation(x, _channel_form(scale)))


def _is_number(value, number: float) -> bool:
    return isinstance(value, numbers.Number) and value == number


def _pair(a: Moments, b: Moments) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moments of two random operands in one broadcastable layout: channel vectors (each operand stationary
    per channel, e.g. a squeeze-excitation gate ``[C, 1, 1]`` against ``[C, H, W]``) or unit maps."""
    if a.is_per_unit or b.is_per_unit:
        return True, a.unit_mean, a.unit_var, b.unit_mean, b.unit_var
    return False, a.loc, a.spread, b.loc, b.spread


def _add(a: Operand, b: Operand, sign: float, alpha, out_shape) -> Moments:
    scale_b = sign * alpha
    if isinstance(a, Moments) and isinstance(b, Moments):
        if a is b:
            return _affine_constant(a, 1 + scale_b, 0.0, out_shape)
        per_unit, ma, va, mb, vb = _pair(a, b)
        third = None
        if a.third is not None and b.third is not None:  # third cumulants of independent operands add
            ta, tb = (a.unit_third, b.unit_third) if per_unit else (a.third, b.third)
            third = ta + scale_b**3 * tb
        out = _result(ma + mb if scale_b == 1 else ma + scale_b * mb,
                      va + vb if scale_b**2 == 1 else va + scale_b**2 * vb, out_shape, per_unit, third)
        if a.shape != b.shape or out.shape != a.shape:
            return out
        return replace(out, neighbours=_sum_template(a, b, scale_b), channel_correlation=sum_correlation(a, b, scale_b))
    if isinstance(a, Moments):
        return _affine_constant(a, 1.0, b * scale_b if scale_b != 1 else b, out_shape)
    return _affine_constant(b, scale_b, a, out_shape)


def _sum_template(a: Moments, b: Moments, scale_b: float) -> torch.Tensor | None:
    """The neighbour template of ``a + scale_b b`` (independent operands of one shape), or None."""
    if a.neighbours is None and b.neighbours is None:
        return None
    radius = template_radius(a.neighbours if a.neighbours is not None else b.neighbours)
    return add_templates(a.unit_average_var, template_of(a, radius), scale_b**2 * b.unit_average_var,
                         template_of(b, radius))


@moment_rule("add")
def add(a: Operand, b: Operand, *, alpha=1, out_shape: tuple[int, ...], **_) -> Moments:
    """``a + alpha b``: means add; variances add for independent random operands; a constant shifts."""
    return _add(a, b, 1.0, alpha, out_shape)


@moment_rule("sub")
def sub(a: Operand, b: Operand, *, alpha=1, out_shape: tuple[int, ...], **_) -> Moments:
    """``a - alpha b``: as :func:`add` with ``-alpha``."""
    return _add(a, b, -1.0, alpha, out_shape)


@moment_rule("mul")
def mul(a: Operand, b: Operand, *, out_shape: tuple[int, ...], **_) -> Moments:
    """``a * b``. Constant c: mean ``c m``, var ``c^2 v``. Independent random operands (e.g. a
    squeeze-excitation gate): mean ``m_a m_b``, var ``(v_a + m_a^2)(v_b + m_b^2) - m_a^2 m_b^2``.
    ``x * x`` of a Gaussian: mean ``v + m^2``, var ``2 v^2 + 4 m^2 v``."""
    if isinstance(a, Moments) and isinstance(b, Moments):
        if a is b:
            m, v = a.loc, a.spread
            return Moments(v + m * m, 2 * v * v + 4 * m * m * v, a.shape)
        per_unit, ma, va, mb, vb = _pair(a, b)
        if ma.shape == mb.shape and plain(a, b):
            mean, var = fused(PRODUCT, ma, va, mb, vb)
        else:
            mean, var = independent_product(ma, va, mb, vb)
        out = _result(mean, var, out_shape, per_unit)
        for x, gate in ((a, b), (b, a)):
            if tuple(out_shape) == x.shape and gate.positions == 1 and x.positions > 1:
                return replace(out, neighbours=_gated_template(x, gate), channel_correlation=gated_correlation(x, gate))
        return out
    if isinstance(a, Moments):
        return _affine_constant(a, b, 0.0, out_shape)
    return _affine_constant(b, a, 0.0, out_shape)


def independent_product(mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``m_a m_b`` and variance ``(v_a + m_a^2)(v_b + m_b^2) - m_a^2 m_b^2`` of the product of independent
    values (exact)."""
    mean = mean_a * mean_b
    return mean, (var_a + mean_a * mean_a) * (var_b + mean_b * mean_b) - mean * mean


@dataclass(frozen=True)
class Product(FusedForm):
    """:func:`independent_product` as one fused op (operands of one shape). Backward: ``d mean = m_b dm_a +
    m_a dm_b``; ``d var/dv_a = v_b + m_b^2``, ``d var/dm_a = 2 m_a v_b`` (and symmetrically)."""

    def reference(self, mean_a, var_a, mean_b, var_b):
        return independent_product(mean_a, var_a, mean_b, var_b)

    def backward(self, inputs, outputs, grads, residuals=()):
        mean_a, var_a, mean_b, var_b = inputs
        grad_mean, grad_var = (torch.zeros_like(mean_a) if g is None else g for g in grads)
        return (grad_mean * mean_b + grad_var * (2 * mean_a * var_b), grad_var * (var_b + mean_b * mean_b),
                grad_mean * mean_a + grad_var * (2 * mean_b * var_a), grad_var * (var_a + mean_a * mean_a))


PRODUCT = Product()


def _gated_template(x: Moments, gate: Moments) -> torch.Tensor | None:
    """The neighbour template of ``x g`` for a gate ``g`` constant over positions (squeeze-excitation), or None."""
    if x.neighbours is None:
        return None
    return product_template(x.mean, x.unit_average_var, x.neighbours, gate.mean, gate.var)


@moment_rule("div")
def div(a: Operand, b: Operand, *, out_shape: tuple[int, ...], **_) -> Moments:
    """``x / c`` for a constant c: as :func:`mul` with ``1/c``. Division by a random tensor has no rule."""
    if isinstance(b, Moments):
        raise RuleError("division by a random tensor has no moment rule; only x / constant is supported")
    return _affine_constant(a, 1.0 / torch.as_tensor(b), 0.0, out_shape)


@moment_rule("neg")
def neg(x: Moments, *, out_shape: tuple[int, ...], **_) -> Moments:
    """``-x``: mean ``-m``, var ``v``."""
    return Moments(-x.loc, x.spread, x.shape)


@moment_rule("cat")
def cat(*parts: Moments, dim: int = 0, out_shape: tuple[int, ...], **_) -> Moments:
    """Concatenation. Along channels (dim 1): the channel moments are concatenated. Along another dim the
    unit maps are concatenated (channel moments then mix the parts by their sizes)."""
    if not all(isinstance(part, Moments) for part in parts):
        raise RuleError("cat of random and constant tensors has no moment rule; concatenate activations only")
    ndim = len(out_shape) + 1
    dim = dim % ndim
    if dim == 0:
        raise RuleError("cat along the batch dim has no moment rule")
    skewed = all(part.third is not None for part in parts)  # accurate mode: concatenate third cumulants too
    neighbours = _concatenated_templates(parts) if dim == 1 else None
    channel_correlation = concatenated_correlation(parts) if dim == 1 else None
    if dim == 1 and not any(part.is_per_unit for part in parts):
        third = torch.cat([p.third for p in parts]) if skewed else None
        return Moments(torch.cat([p.loc for p in parts]), torch.cat([p.spread for p in parts]), tuple(out_shape),
                       third=third, neighbours=neighbours,
                       channel_correlation=channel_correlation)
    mean = torch.cat([p.unit_mean for p in parts], dim=dim - 1)
    var = torch.cat([p.unit_var for p in parts], dim=dim - 1)
    third = torch.cat([p.unit_third for p in parts], dim=dim - 1) if skewed else None
    if len(out_shape) > 1:
        return Moments(mean, var, tuple(mean.shape), third=third, neighbours=neighbours,
                       channel_correlation=channel_correlation)
    return Moments(mean, var, tuple(out_shape), third=third)


def _concatenated_templates(parts: tuple[Moments, ...]) -> torch.Tensor | None:
    """The parts' neighbour templates one after the other along channels (independent for a part without)."""
    known = [part.neighbours for part in parts if part.neighbours is not None]
    if not known or len(parts[0].shape) < 2:
        return None
    if any(t.shape[1:] != known[0].shape[1:] for t in known):
        return None
    radius = template_radius(known[0])
    return torch.cat([template_of(part, radius) for part in parts])
