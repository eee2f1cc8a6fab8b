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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..moments import Moments, MonotoneSource
from . import moment_rule
from .channel_correlation import activation_correlation
from .gaussian import Z_LIMIT, interval_moments, legendre_nodes, safe_std
from .neighbours import activation_template, hermite_coefficients
from .skewness import activation_with_skew

# Gauss-Legendre nodes per panel for the remainder of smooth activations (two panels, split at 0).
# tests/rules/test_quadrature.py measures the error against a dense reference integration.
NODES = 48

Polynomial = Sequence[float]  # coefficients c_0, c_1, ... of sum_k c_k x^k
MomentsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
PartialMoments = Callable[[torch.Tensor, torch.Tensor, int], list[torch.Tensor]]


# Polynomials in z with tensor coefficients keep a zero coefficient as None and skip powers 0 and 1, so that the
# recorded statistics program (graphnorm.program) holds no op that adds a zero or multiplies by one.


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _power(x: torch.Tensor, exponent: int) -> torch.Tensor | None:
    """``x ** exponent``; None for exponent 0 (the constant 1)."""
    return None if exponent == 0 else x if exponent == 1 else x**exponent


def _scaled(constant: float, *factors: torch.Tensor | None) -> torch.Tensor | float:
    """``constant * prod(factors)`` (None factors are 1); a float when every factor is None."""
    product: torch.Tensor | None = None
    for factor in factors:
        if factor is not None:
            product = factor if product is None else product * factor
    if product is None:
        return constant
    return product if constant == 1 else constant * product


def _compose_affine(coefficients: Polynomial, shift: torch.Tensor, scale: torch.Tensor
                    ) -> list[torch.Tensor | None]:
    """Coefficients in z of ``p(shift + scale z)`` (binomial expansion): tensors, floats for constants, None
    for zero."""
    result: list[torch.Tensor | None] = [None for _ in coefficients]
    for i, c in enumerate(coefficients):
        if c == 0:
            continue
        for k in range(i + 1):
            term = _scaled(c * math.comb(i, k), _power(shift, i - k), _power(scale, k))
            result[k] = _add(result[k], term)  # a float for a constant term
    return result


def _multiply(p: list[torch.Tensor | None], q: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = [None for _ in range(len(p) + len(q) - 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            if a is not None and b is not None:
                out[i + j] = _add(out[i + j], a * b)
    return out


def _dot(coefficients: list[torch.Tensor | None], moments: list[torch.Tensor]) -> torch.Tensor | None:
    total = None
    for c, moment in zip(coefficients, moments, strict=False):
        if c is not None:
            total = _add(total, c * moment)
    return total


def centered_piecewise(mean: torch.Tensor, std: torch.Tensor, breakpoints: Sequence[float],
                       pieces: Sequence[Polynomial], reference: torch.Tensor,
                       partial_moments: PartialMoments = interval_moments, orders: int = 2
                       ) -> tuple[torch.Tensor, ...]:
    """``E[(g(X) - c)^k]`` for k = 1..orders (2 or 3), piecewise-polynomial g and ``X = mean + std B``,
    c = reference.

    B is standard normal by default; ``partial_moments(alpha, beta, k)`` gives ``E[B^j 1{alpha < B < beta}]``,
    j = 0..k, for another standardized base (e.g. the max of n normals).
    ``pieces[j]`` holds on ``(breakpoints[j-1], breakpoints[j])``, the outer pieces unbounded."""
    assert len(pieces) == len(breakpoints) + 1
    edges = [None, *breakpoints, None]
    sums: list[torch.Tensor | None] = [None] * orders
    for j, coefficients in enumerate(pieces):
        lower, upper = edges[j], edges[j + 1]
        alpha = torch.full_like(mean, -Z_LIMIT) if lower is None else (lower - mean) / std
        beta = torch.full_like(mean, Z_LIMIT) if upper is None else (upper - mean) / std
        poly = _compose_affine(coefficients, mean, std)
        poly[0] = -reference if poly[0] is None else poly[0] - reference
        powers = [poly]
        for _ in range(orders - 1):
            powers.append(_multiply(powers[-1], poly))
        order = max(k for k, c in enumerate(powers[-1]) if c is not None)
        moments = partial_moments(alpha, beta, order)
        sums = [_add(total, _dot(power, moments)) for total, power in zip(sums, powers, strict=True)]
    return tuple(sums)


def piecewise_polynomial_moments(mean: torch.Tensor, var: torch.Tensor, breakpoints: Sequence[float],
                                 pieces: Sequence[Polynomial], function: Callable[[torch.Tensor], torch.Tensor]
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and variance of ``f(X)``, X ~ N(mean, var), f piecewise polynomial (``function`` evaluates
    f itself, for the stabilizing shift ``f(mean)``)."""
    reference = function(mean)
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
    reference = activation.function(mean)
    below, above = activation.asymptote
    first, second = centered_piecewise(mean, std, [0.0], [below, above], reference)
    lower = torch.clamp(mean - 10 * std, min=-activation.reach)
    upper = torch.maximum(torch.clamp(mean + 10 * std, max=activation.reach), lower)
    middle = torch.clamp(torch.zeros_like(mean), min=lower, max=upper)
    points, weights = legendre_nodes(nodes, mean)
    m, s, c = mean.unsqueeze(-1), std.unsqueeze(-1), reference.unsqueeze(-1)
    for a, b in ((lower, middle), (middle, upper)):
        half = (0.5 * (b - a)).unsqueeze(-1)
        x = (0.5 * (a + b)).unsqueeze(-1) + half * points
        density = torch.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        asymptote = torch.where(x < 0, _evaluate(below, x), _evaluate(above, x))
        remainder = activation.function(x) - asymptote
        weight = weights * half * density
        first = first + (weight * remainder).sum(-1)
        second = second + (weight * remainder * (2 * (asymptote - c) + remainder)).sum(-1)
    return reference + first, (second - first * first).clamp_min(0)


def _elementwise(x: Moments, moments_fn: MomentsFn, function: Callable[[torch.Tensor], torch.Tensor],
                 again: Callable[[Moments], Moments] | None, piecewise: tuple | None = None) -> Moments:
    """Apply a per-unit moment function; ``again`` (the rule itself) marks a monotone activation."""
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
                    function: Callable[[torch.Tensor], torch.Tensor], monotone: bool) -> Moments:
    again = partial(_piecewise_rule, breakpoints=breakpoints, pieces=pieces, function=function, monotone=monotone)
    return _elementwise(x, partial(piecewise_polynomial_moments, breakpoints=breakpoints, pieces=pieces,
                                   function=function), function, again if monotone else None,
                        (breakpoints, pieces))


def _smooth_rule(x: Moments, activation: SmoothActivation, monotone: bool) -> Moments:
    again = partial(_smooth_rule, activation=activation, monotone=monotone)
    return _elementwise(x, partial(smooth_moments, activation=activation), activation.function,
                        again if monotone else None)


def _clamp_rule(x: Moments, low: float | None, high: float | None) -> Moments:
    breakpoints: list[float] = []
    pieces: list[Polynomial] = []
    if low is not None:
        breakpoints.append(low)
        pieces.append([low])
    pieces.append([0.0, 1.0])
    if high is not None:
        breakpoints.append(high)
        pieces.append([high])
    return _piecewise_rule(x, breakpoints, pieces, partial(torch.clamp, min=low, max=high), monotone=True)


# -- piecewise polynomial activations ----------------------------------------------------------------------------
def rectified_gaussian_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU of N(m, v) in closed form (the piecewise-polynomial result, written out because ReLU is the most
    frequent op of a moment pass): with ``a = m/s``, mean ``s (a Phi(a) + phi(a))`` and variance
    ``v (Phi(a) + a^2 Phi(a) Phi(-a) + a phi(a) (1 - 2 Phi(a)) - phi(a)^2)``, an arrangement of
    ``(m^2 + v) Phi(a) + m s phi(a) - mean^2`` without the cancellation of ``a^2`` terms at large ``a``."""
    std = safe_std(var)
    a = mean / std
    cdf, tail, density = torch.special.ndtr(a), torch.special.ndtr(-a), torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    out_mean = torch.where(tail > 0, std * (a * cdf + density), mean)  # far above 0 the ReLU is the identity
    bounded = a.clamp(-Z_LIMIT, Z_LIMIT)  # beyond it phi and one of the tails vanish: no inf * 0
    ratio = cdf + bounded * bounded * cdf * tail + bounded * density * (tail - cdf) - density * density
    return out_mean, var * ratio.clamp_min(0)


_RELU_PIECES = ([0.0], [[0.0], [0.0, 1.0]])


@moment_rule("relu")
def relu(x: Moments, **_) -> Moments:
    """ReLU of a Gaussian (rectified Gaussian; Frey & Hinton 1999): mean ``m Phi(a) + s phi(a)``,
    ``E[y^2] = (m^2 + v) Phi(a) + m s phi(a)``, ``a = m/s``. N(0, 1) gives (0.398942, 0.340845)."""
    return _elementwise(x, rectified_gaussian_moments, torch.relu, relu, _RELU_PIECES)


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
_RELU_ASYMPTOTE = ([0.0], [0.0, 1.0])


@moment_rule("sigmoid")
def sigmoid(x: Moments, **_) -> Moments:
    """Logistic sigmoid of a Gaussian: step asymptote plus quadrature of the remainder (no closed form)."""
    return _smooth_rule(x, SmoothActivation(torch.sigmoid, ([0.0], [1.0]), 40.0), monotone=True)


@moment_rule("tanh")
def tanh(x: Moments, **_) -> Moments:
    """tanh of a Gaussian: sign asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, SmoothActivation(torch.tanh, ([-1.0], [1.0]), 20.0), monotone=True)


@moment_rule("gelu")
def gelu(x: Moments, *, approximate: str = "none", **_) -> Moments:
    """GELU (exact or tanh-approximated) of a Gaussian: ReLU asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, SmoothActivation(partial(F.gelu, approximate=approximate), _RELU_ASYMPTOTE, 40.0),
                        monotone=False)


@moment_rule("silu")
def silu(x: Moments, **_) -> Moments:
    """SiLU ``x S(x)`` of a Gaussian: ReLU asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, SmoothActivation(F.silu, _RELU_ASYMPTOTE, 45.0), monotone=False)


@moment_rule("elu")
def elu(x: Moments, *, alpha: float = 1.0, **_) -> Moments:
    """ELU(alpha) of a Gaussian: asymptotes ``-alpha`` below 0 and ``x`` above, quadrature of the remainder."""
    activation = SmoothActivation(partial(F.elu, alpha=alpha), ([-alpha], [0.0, 1.0]), 40.0)
    return _smooth_rule(x, activation, monotone=alpha >= 0)


@moment_rule("softplus")
def softplus(x: Moments, *, beta: float = 1.0, threshold: float = 20.0, **_) -> Moments:
    """Softplus ``log(1 + exp(beta x))/beta`` of a Gaussian: ReLU asymptote plus quadrature of the remainder."""
    activation = SmoothActivation(partial(F.softplus, beta=beta, threshold=threshold), _RELU_ASYMPTOTE, 40.0 / beta)
    return _smooth_rule(x, activation, monotone=True)


@moment_rule("mish")
def mish(x: Moments, **_) -> Moments:
    """Mish ``x tanh(softplus(x))`` of a Gaussian: ReLU asymptote plus quadrature of the remainder."""
    return _smooth_rule(x, SmoothActivation(F.mish, _RELU_ASYMPTOTE, 45.0), monotone=False)
