"""Moment rules of elementwise activations, under the assumption that the input is Gaussian per unit.

Two families, both exact up to the Gaussian-input assumption and floating point:

- **Piecewise polynomials** (ReLU, ReLU6, LeakyReLU, Hardtanh, clamp, Hardsigmoid, Hardswish): closed form.
  With ``X = m + s Z`` each piece ``p_j(x)`` on ``[b_j, b_{j+1}]`` becomes a polynomial in ``Z`` on
  ``[(b_j - m)/s, (b_{j+1} - m)/s]``, and ``E[Z^k 1{alpha < Z < beta}]`` has a recurrence
  (:func:`~graphnorm.rules.gaussian.interval_moments`). This reproduces the rectified-Gaussian formulas of
  ReLU (``m Phi(a) + s phi(a)``; Frey & Hinton 1999, used in AP2 by Shekhovtsov & Flach 2018), the
  truncated-normal formulas of clamps, and extends them to Hardswish (degree 2).
- **Smooth functions** (sigmoid, tanh, GELU, SiLU, ELU, softplus, Mish): ``f = g + r`` with ``g`` the
  piecewise-linear asymptote (exact, as above) and a remainder ``r`` that vanishes away from 0, integrated by
  Gauss-Legendre where both it and the Gaussian density live (:func:`smooth_moments`). Plain Gauss-Hermite
  quadrature (MATH.md's suggestion) loses accuracy when the input std is large against the bend of f
  (0.4% of the variance of tanh at std 4 with 64 nodes, tests/rules/test_quadrature.py); this split does not.

Both compute the moments of ``f(X) - f(m)`` rather than of ``f(X)``, so a large ``|m|/s`` does not cancel
the variance away. Monotone activations tag their output with a :class:`~graphnorm.moments.MonotoneSource`
so max-pooling can commute with them (see :mod:`graphnorm.rules.pooling`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F

from ..moments import Moments, MonotoneSource
from . import moment_rule
from .channel_correlation import activation_correlation
from .fusion import FusedForm, fused, plain
from .gaussian import Z_LIMIT, interval_moments, legendre_nodes, ndtr, safe_std
from .neighbours import activation_template, hermite_coefficients
from .piecewise import (
    Polynomial,
    centered_gradients,
    centered_piecewise,
    centered_piecewise_derivatives,
    evaluate_piecewise,
)
from .skewness import activation_with_skew

# Gauss-Legendre nodes per panel for the remainder of smooth activations (two panels, split at 0).
# tests/rules/test_quadrature.py measures the error against a dense reference integration.
NODES = 48

MomentsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def piecewise_polynomial_moments(mean: torch.Tensor, var: torch.Tensor, breakpoints: Sequence[float],
                                 pieces: Sequence[Polynomial]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and variance of ``f(X)``, X ~ N(mean, var), f piecewise polynomial, computed about the
    stabilizing shift ``f(mean)``."""
    reference = evaluate_piecewise(mean, breakpoints, pieces)
    first, second = centered_piecewise(mean, safe_std(var), breakpoints, pieces, reference)
    return reference + first, (second - first * first).clamp_min(0)


@dataclass(frozen=True)
class SmoothActivation:
    """A smooth activation ``f = g + r``: ``g`` piecewise linear with its one breakpoint at 0 (the asymptotes:
    ReLU for GELU/SiLU/softplus/Mish, a step for sigmoid, a sign for tanh), ``r = f - g`` below 1e-15 for
    ``|x| > reach``."""

    function: Callable[[torch.Tensor], torch.Tensor]
    asymptote: tuple[Polynomial, Polynomial]  # g below 0, g above 0
    reach: float


_RELU_ASYMPTOTE = ([0.0], [0.0, 1.0])


@cache
def smooth_activation(name: str, params: tuple[tuple[str, Any], ...] = ()) -> SmoothActivation:
    """The smooth activation ``name`` with keyword parameters ``params`` (e.g. ``(("approximate", "tanh"),)``)."""
    kwargs = dict(params)
    if name == "sigmoid":
        return SmoothActivation(torch.sigmoid, ([0.0], [1.0]), 40.0)
    if name == "tanh":
        return SmoothActivation(torch.tanh, ([-1.0], [1.0]), 20.0)
    if name == "gelu":
        return SmoothActivation(partial(F.gelu, **kwargs), _RELU_ASYMPTOTE, 40.0)
    if name == "silu":
        return SmoothActivation(F.silu, _RELU_ASYMPTOTE, 45.0)
    if name == "elu":
        alpha = kwargs.get("alpha", 1.0)
        return SmoothActivation(partial(F.elu, alpha=alpha), ([-alpha], [0.0, 1.0]), 40.0)
    if name == "softplus":
        return SmoothActivation(partial(F.softplus, **kwargs), _RELU_ASYMPTOTE, 40.0 / kwargs.get("beta", 1.0))
    if name == "mish":
        return SmoothActivation(F.mish, _RELU_ASYMPTOTE, 45.0)
    raise ValueError(f"no smooth activation named {name!r}")


def _smooth_parts(mean: torch.Tensor, std: torch.Tensor, activation: SmoothActivation, nodes: int
                  ) -> tuple[torch.Tensor, ...]:
    """The quadrature of :func:`smooth_moments`, both panels at once: the reference ``c = f(mean)``, and per
    node ``[..., 2, nodes]`` the standardized position ``u = (x - mean)/std``, the weight (Gauss-Legendre
    weight times half the panel times the density), the remainder ``r(x)`` and the asymptote ``g(x)``."""
    reference = activation.function(mean)
    below, above = activation.asymptote
    lower = torch.clamp(mean - 10 * std, min=-activation.reach)
    upper = torch.maximum(torch.clamp(mean + 10 * std, max=activation.reach), lower)
    middle = torch.clamp(torch.zeros_like(mean), min=lower, max=upper)
    points, weights = legendre_nodes(nodes, mean)
    start, end = torch.stack((lower, middle), -1).unsqueeze(-1), torch.stack((middle, upper), -1).unsqueeze(-1)
    half = 0.5 * (end - start)
    x = 0.5 * (start + end) + half * points
    s = std[..., None, None]
    u = (x - mean[..., None, None]) / s
    density = torch.exp(-0.5 * u * u) / (s * math.sqrt(2 * math.pi))
    asymptote = torch.where(x < 0, _evaluate(below, x), _evaluate(above, x))
    remainder = activation.function(x) - asymptote
    return reference, u, weights * half * density, remainder, asymptote


def _evaluate(coefficients: Polynomial, x: torch.Tensor) -> torch.Tensor:
    return sum(c * x**k for k, c in enumerate(coefficients)) + torch.zeros_like(x)


def smooth_moments(mean: torch.Tensor, var: torch.Tensor, activation: SmoothActivation, nodes: int = NODES
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``f(X)``, X ~ N(mean, var), for a smooth activation ``f = g + r``.

    ``E[(f - c)^k]`` splits into the exact piecewise-linear part ``E[(g - c)^k]`` and the remainder terms
    ``E[r]`` and ``E[r (2 (g - c) + r)]``, whose integrands vanish outside ``|x| < reach`` and outside
    ``mean +- 10 std``. Those are integrated by Gauss-Legendre on that intersection, split at g's kink at 0,
    so the quadrature only meets smooth integrands on intervals where they are resolved.
    """
    std = safe_std(var)
    reference, _, weight, remainder, asymptote = _smooth_parts(mean, std, activation, nodes)
    first, second = centered_piecewise(mean, std, [0.0], list(activation.asymptote), reference)
    first = first + (weight * remainder).sum((-2, -1))
    second = second + (weight * remainder * (2 * (asymptote - reference[..., None, None]) + remainder)).sum((-2, -1))
    return reference + first, (second - first * first).clamp_min(0)


def _elementwise(x: Moments, moments_fn: MomentsFn, function: Callable[[torch.Tensor], torch.Tensor],
                 again: Callable[[Moments], Moments] | None, piecewise: tuple | None = None,
                 form: FusedForm | None = None) -> Moments:
    """Apply a per-unit moment function (its fused ``form`` where one applies, :mod:`.fusion`); ``again`` (the
    rule itself) marks a monotone activation."""
    if form is not None and plain(x):
        mean, var = fused(form, x.loc, x.spread)
    else:
        mean, var = moments_fn(x.loc, x.spread)
    third = None
    if x.third is not None:  # accurate mode: correct for the input's skewness, pass the output's on
        mean, var, third = activation_with_skew(function, x.loc, x.spread, x.third, mean, var)
    neighbours = channel_correlation = None
    if x.neighbours is not None or x.channel_correlation is not None:  # accurate mode: correlations through f
        coefficients = hermite_coefficients(function, x.mean, x.unit_average_var)  # Mehler's formula
        if x.neighbours is not None:
            neighbours = activation_template(coefficients, x.neighbours)
        channel_correlation = activation_correlation(coefficients, x)
    out = Moments(mean, var, x.shape, third=third, neighbours=neighbours, channel_correlation=channel_correlation)
    return out if again is None else out.with_monotone_source(MonotoneSource(function, again, x, piecewise))


def _piecewise_rule(x: Moments, breakpoints: Sequence[float], pieces: Sequence[Polynomial],
                    function: Callable[[torch.Tensor], torch.Tensor], monotone: bool,
                    form: FusedForm | None = None) -> Moments:
    """``form``: a fused form specialized to this function (default: the general :class:`PiecewiseMoments`)."""
    again = partial(_piecewise_rule, breakpoints=breakpoints, pieces=pieces, function=function, monotone=monotone,
                    form=form)
    form = form or PiecewiseMoments(tuple(breakpoints), tuple(tuple(p) for p in pieces))
    return _elementwise(x, form.reference, function, again if monotone else None, (breakpoints, pieces), form)


def _smooth_rule(x: Moments, name: str, monotone: bool, **params: Any) -> Moments:
    again = partial(_smooth_rule, name=name, monotone=monotone, **params)
    form = SmoothMoments(name, tuple(sorted(params.items())))
    return _elementwise(x, form.reference, form.activation.function, again if monotone else None, form=form)


def _clamp_rule(x: Moments, low: float | None, high: float | None) -> Moments:
    form = Clamped(low, high)
    return _piecewise_rule(x, *form.pieces(), partial(torch.clamp, min=low, max=high), monotone=True, form=form)


# -- fused forms (graphnorm.rules.fusion): the moment functions above as single ops with closed-form backward --
@dataclass(frozen=True)
class Rectified(FusedForm):
    """ReLU's moments (:func:`rectified_gaussian_moments`). Backward, with ``a = m/s``:
    ``d mean/dm = Phi(a)``, ``d mean/dv = phi(a)/(2 s)``, ``d var/dm = 2 mean Phi(-a)``,
    ``d var/dv = Phi(a) - mean phi(a)/s`` (Stein's lemma: ``d/dm E[f] = E[f']``, ``d/dv E[f] = E[f'']/2``)."""

    def reference(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rectified_gaussian_moments(mean, var)

    def forward(self, mean: torch.Tensor, var: torch.Tensor):
        parts = _rectified_parts(mean, var)
        return _rectified_moments(mean, var, *parts), (parts[0], *parts[2:])

    def backward(self, inputs, outputs, grads, residuals=()):
        mean, var = inputs
        out_mean = outputs[0]
        if residuals:
            std, cdf, tail, density = residuals
        else:
            std, _, cdf, tail, density = _rectified_parts(mean, var)
        zero = torch.zeros_like(mean)
        grad_mean = zero if grads[0] is None else grads[0]
        grad_var = zero if grads[1] is None else grads[1]
        grad_m = grad_mean * cdf + grad_var * (2 * out_mean * tail)
        grad_v = grad_mean * density / (2 * std) + grad_var * (cdf - out_mean * density / std)
        return grad_m, grad_v


@dataclass(frozen=True)
class PiecewiseMoments(FusedForm):
    """A piecewise-polynomial activation's moments (:func:`piecewise_polynomial_moments`); backward by the
    derivatives of :mod:`.piecewise` (Leibniz's rule)."""

    breakpoints: tuple[float, ...]
    pieces: tuple[tuple[float, ...], ...]

    def reference(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return piecewise_polynomial_moments(mean, var, self.breakpoints, self.pieces)

    def backward(self, inputs, outputs, grads, residuals=()):
        mean, var = inputs
        std = safe_std(var)
        reference = evaluate_piecewise(mean, self.breakpoints, self.pieces)
        first, second, *derivatives = centered_piecewise_derivatives(mean, std, self.breakpoints, self.pieces,
                                                                     reference)
        return centered_gradients(first, derivatives, second - first * first, var, std, grads)


@dataclass(frozen=True)
class Clamped(FusedForm):
    """``clamp(X, low, high)``'s moments (ReLU6, Hardtanh, clamp; either bound may be None) written out, with
    ``c = clamp(m, low, high)``, ``d = m - c``, limits ``alpha = (low - m)/s``, ``beta = (high - m)/s`` and the
    normal's partial moments ``M_k`` on ``(alpha, beta)``: ``E[f - c] = (low - c) Phi(alpha) + (high - c)
    Phi(-beta) + d M_0 + s M_1`` and ``E[(f - c)^2] = (low - c)^2 Phi(alpha) + (high - c)^2 Phi(-beta) +
    d^2 M_0 + 2 d s M_1 + s^2 M_2``. Backward (c held fixed; a continuous f has no boundary terms):
    ``d/dm E[f - c] = M_0``, ``d/ds = M_1``, ``d/dm E[(f - c)^2] = 2 (d M_0 + s M_1)``, ``d/ds = 2 (d M_1 +
    s M_2)``. The reference is the general piecewise-polynomial code (:class:`PiecewiseMoments`), which this
    equals; written out it is a tenth of the ops."""

    low: float | None
    high: float | None

    def pieces(self) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
        """The breakpoints and pieces of the clamp as :func:`piecewise_polynomial_moments` takes them."""
        breakpoints = tuple(b for b in (self.low, self.high) if b is not None)
        pieces = (*(((self.low,),) if self.low is not None else ()), (0.0, 1.0),
                  *(((self.high,),) if self.high is not None else ()))
        return breakpoints, pieces

    def reference(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return piecewise_polynomial_moments(mean, var, *self.pieces())

    def _centred(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(c, first, second, M_0, M_1, M_2, d, s)``: the centred moments and what their derivatives need."""
        std = safe_std(var)
        centre = mean.clamp(self.low, self.high)
        offset = mean - centre
        alpha = ((self.low - mean) / std if self.low is not None else torch.full_like(mean, -Z_LIMIT))
        beta = ((self.high - mean) / std if self.high is not None else torch.full_like(mean, Z_LIMIT))
        m0, m1, m2 = interval_moments(alpha, beta, 2)
        first = offset * m0 + std * m1
        second = offset * (offset * m0 + 2 * std * m1) + std * std * m2
        for bound, tail in ((self.low, alpha), (self.high, -beta)):
            if bound is not None:
                gap, probability = bound - centre, ndtr(tail.clamp(-Z_LIMIT, Z_LIMIT))
                first = first + gap * probability
                second = second + gap * gap * probability
        return centre, first, second, m0, m1, m2, offset, std

    def forward(self, mean: torch.Tensor, var: torch.Tensor):
        with torch.no_grad():
            centre, first, second, *residuals = self._centred(mean, var)
            return (centre + first, (second - first * first).clamp_min(0)), (first, second, *residuals)

    def backward(self, inputs, outputs, grads, residuals=()):
        mean, var = inputs
        if not residuals:
            residuals = self._centred(mean, var)[1:]
        first, second, m0, m1, m2, offset, std = residuals
        derivatives = (m0, m1, 2 * (offset * m0 + std * m1), 2 * (offset * m1 + std * m2))
        return centered_gradients(first, derivatives, second - first * first, var, std, grads)


@dataclass(frozen=True)
class SmoothMoments(FusedForm):
    """A smooth activation's moments (:func:`smooth_moments`). Backward: the asymptote's part by the
    derivatives of :mod:`.piecewise`; the remainder's by the same quadrature of the density's derivatives,
    ``d/dm p = p u/s`` and ``d/ds p = p (u^2 - 1)/s`` (the nodes' own movement with m and s only reaches the
    integrand where it has vanished, ``mean +- 10 std`` or the activation's reach)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    activation: SmoothActivation = field(init=False, compare=False, repr=False)  # (a constant when compiled)

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", smooth_activation(self.name, self.params))

    def reference(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return smooth_moments(mean, var, self.activation)

    def backward(self, inputs, outputs, grads, residuals=()):
        mean, var = inputs
        activation = self.activation
        std = safe_std(var)
        reference, u, weight, remainder, asymptote = _smooth_parts(mean, std, activation, NODES)
        first, second, *derivatives = centered_piecewise_derivatives(mean, std, [0.0], list(activation.asymptote),
                                                                     reference)
        terms = (weight * remainder, weight * remainder * (2 * (asymptote - reference[..., None, None]) + remainder))
        s = std[..., None, None]
        rates = (u / s, (u * u - 1) / s)
        first, second = first + terms[0].sum((-2, -1)), second + terms[1].sum((-2, -1))
        derivatives = [d + (term * rate).sum((-2, -1))
                       for d, (term, rate) in zip(derivatives, itertools.product(terms, rates), strict=True)]
        return centered_gradients(first, derivatives, second - first * first, var, std, grads)


# -- piecewise polynomial activations ----------------------------------------------------------------------------
def rectified_gaussian_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU of N(m, v) in closed form (the piecewise-polynomial result, written out because ReLU is the most
    frequent op of a moment pass): with ``a = m/s``, mean ``s (a Phi(a) + phi(a))`` and variance
    ``v (Phi(a) + a^2 Phi(a) Phi(-a) + a phi(a) (1 - 2 Phi(a)) - phi(a)^2)``, an arrangement of
    ``(m^2 + v) Phi(a) + m s phi(a) - mean^2`` without the cancellation of ``a^2`` terms at large ``a``."""
    return _rectified_moments(mean, var, *_rectified_parts(mean, var))


def _rectified_parts(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(s, a, Phi(a), Phi(-a), phi(a))`` of :func:`rectified_gaussian_moments`."""
    std = safe_std(var)
    a = mean / std
    return std, a, torch.special.ndtr(a), torch.special.ndtr(-a), torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)


def _rectified_moments(mean: torch.Tensor, var: torch.Tensor, std: torch.Tensor, a: torch.Tensor,
                       cdf: torch.Tensor, tail: torch.Tensor, density: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    out_mean = torch.where(tail > 0, std * (a * cdf + density), mean)  # far above 0 the ReLU is the identity
    bounded = a.clamp(-Z_LIMIT, Z_LIMIT)  # beyond it phi and one of the tails vanish: no inf * 0
    ratio = cdf + bounded * bounded * cdf * tail + bounded * density * (tail - cdf) - density * density
    return out_mean, var * ratio.clamp_min(0)


_RELU_PIECES = ([0.0], [[0.0], [0.0, 1.0]])
RECTIFIED = Rectified()


@moment_rule("relu")
def relu(x: Moments, **_) -> Moments:
    """ReLU of a Gaussian (rectified Gaussian; Frey & Hinton 1999): mean ``m Phi(a) + s phi(a)``,
    ``E[y^2] = (m^2 + v) Phi(a) + m s phi(a)``, ``a = m/s``. N(0, 1) gives (0.398942, 0.340845)."""
    return _elementwise(x, rectified_gaussian_moments, torch.relu, relu, _RELU_PIECES, RECTIFIED)


@moment_rule("leaky_relu")
def leaky_relu(x: Moments, *, negative_slope: float = 0.01, **_) -> Moments:
    """LeakyReLU(alpha) of a Gaussian: pieces ``alpha x`` below 0 and ``x`` above (exact)."""
    return _piecewise_rule(x, [0.0], [[0.0, negative_slope], [0.0, 1.0]],
                           partial(F.leaky_relu, negative_slope=negative_slope), monotone=negative_slope >= 0)


@moment_rule("relu6")
def relu6(x: Moments, **_) -> Moments:
    """ReLU6 = clamp to [0, 6] of a Gaussian (truncated-normal moments, exact)."""
    return _clamp_rule(x, 0.0, 6.0)


@moment_rule("hardtanh")
def hardtanh(x: Moments, *, min_val: float = -1.0, max_val: float = 1.0, **_) -> Moments:
    """Hardtanh = clamp to [min_val, max_val] of a Gaussian (exact)."""
    return _clamp_rule(x, float(min_val), float(max_val))


@moment_rule("clamp")
def clamp(x: Moments, *, min_val: float | None = None, max_val: float | None = None, **_) -> Moments:
    """``torch.clamp`` with scalar bounds (either may be None) of a Gaussian (exact)."""
    for bound in (min_val, max_val):
        if bound is not None and not isinstance(bound, (int, float)):
            raise NotImplementedError("clamp with tensor bounds has no moment rule; use scalar bounds")
    return _clamp_rule(x, None if min_val is None else float(min_val), None if max_val is None else float(max_val))


@moment_rule("hardsigmoid")
def hardsigmoid(x: Moments, **_) -> Moments:
    """Hardsigmoid ``clamp(x/6 + 1/2, 0, 1)`` of a Gaussian (exact)."""
    return _piecewise_rule(x, [-3.0, 3.0], [[0.0], [0.5, 1 / 6], [1.0]], F.hardsigmoid, monotone=True)


@moment_rule("hardswish")
def hardswish(x: Moments, **_) -> Moments:
    """Hardswish ``x relu6(x + 3)/6`` of a Gaussian: pieces 0, ``x/2 + x^2/6``, ``x`` (exact, degree 2)."""
    return _piecewise_rule(x, [-3.0, 3.0], [[0.0], [0.0, 0.5, 1 / 6], [0.0, 1.0]], F.hardswish, monotone=False)


# -- smooth activations ------------------------------------------------------------------------------------------
@moment_rule("sigmoid")
def sigmoid(x: Moments, **_) -> Moments:
    """Logistic sigmoid of a Gaussian: step asymptote plus quadrature of the remainder (no closed form)."""
    return _smooth_rule(x, "sigmoid", monotone=True)


@moment_rule("tanh")
def tanh(x: Moments, **_) -> Moments:
    """tanh of a Gaussian: sign asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, "tanh", monotone=True)


@moment_rule("gelu")
def gelu(x: Moments, *, approximate: str = "none", **_) -> Moments:
    """GELU (exact or tanh-approximated) of a Gaussian: ReLU asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, "gelu", monotone=False, approximate=approximate)


@moment_rule("silu")
def silu(x: Moments, **_) -> Moments:
    """SiLU ``x S(x)`` of a Gaussian: ReLU asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, "silu", monotone=False)


@moment_rule("elu")
def elu(x: Moments, *, alpha: float = 1.0, **_) -> Moments:
    """ELU(alpha) of a Gaussian: asymptotes ``-alpha`` below 0 and ``x`` above, quadrature of the remainder."""
    return _smooth_rule(x, "elu", monotone=alpha >= 0, alpha=float(alpha))


@moment_rule("softplus")
def softplus(x: Moments, *, beta: float = 1.0, threshold: float = 20.0, **_) -> Moments:
    """Softplus ``log(1 + exp(beta x))/beta`` of a Gaussian: ReLU asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, "softplus", monotone=True, beta=float(beta), threshold=float(threshold))


@moment_rule("mish")
def mish(x: Moments, **_) -> Moments:
    """Mish ``x tanh(softplus(x))`` of a Gaussian: ReLU asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, "mish", monotone=False)
