"""Expectations of piecewise polynomials of ``X = m + s B``, B a standardized base variable (the standard normal,
or the max of n standard normals for max-pooling), and their derivatives with respect to m and s.

A function f with pieces ``p_j`` on ``(b_{j-1}, b_j)`` (the outer pieces unbounded) covers ``B`` in
``(alpha_j, beta_j)``, ``alpha_j = (b_{j-1} - m)/s``, and ``p_j(m + s z)`` is a polynomial in z (binomial
expansion), so ``E[(f(X) - c)^k] = sum_j sum_i q_{j,i} M_i(alpha_j, beta_j)`` with the base's partial moments
``M_i(alpha, beta) = E[B^i 1{alpha < B < beta}]``: a recurrence for the normal
(:func:`~graphnorm.rules.gaussian.interval_moments`), linear interpolation in cumulative tables for the max
(:func:`~graphnorm.rules.gaussian.max_interval_moments`). Moments are taken about a reference ``c`` (the
caller's ``f(m)``) so that a large ``|m|/s`` does not cancel them away.

The derivatives are Leibniz's rule under the integral. For ``I_j(m, s) = E[h_j(m + s B) 1{alpha_j < B < beta_j}]``:

- inside, ``d/dm h_j(m + s z) = h_j'(m + s z)`` and ``d/ds h_j(m + s z) = z h_j'(m + s z)``, so
  ``dI_j/dm = E[h_j'(X) 1_j]`` and ``dI_j/ds = E[B h_j'(X) 1_j]``, again sums of partial moments;
- at a limit, ``dI_j/dbeta_j = sum_i h_{j,i} dM_i/dbeta`` (``beta^i q(beta)`` for a density q; the slope of the
  interpolated table for the max, exactly what the table's values are a function of), with
  ``dbeta/dm = -1/s`` and ``dbeta/ds = -beta/s``.

With ``h = f - c`` and ``h = (f - c)^2`` this gives the derivatives of the first two centred moments, holding c
fixed (their combinations ``mean = c + E[f - c]`` and ``var = E[(f - c)^2] - E[f - c]^2`` do not depend on c).
Continuous pieces cancel their limit terms for a density; a jump (the step asymptote of a sigmoid) keeps them.
These are the closed-form backward of :mod:`graphnorm.rules.fusion`'s activation and pooling forms.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch

from .gaussian import Z_LIMIT, interval_moments, max_interval_moments, max_interval_slopes, pdf

__all__ = ["GAUSSIAN", "Base", "Polynomial", "centered_gradients", "centered_piecewise",
           "centered_piecewise_derivatives", "evaluate_piecewise", "max_base"]

Polynomial = Sequence[float]  # coefficients c_0, c_1, ... of sum_k c_k x^k
PartialMoments = Callable[[torch.Tensor, torch.Tensor, int], list[torch.Tensor]]
Coefficients = list[torch.Tensor | float | None]  # a polynomial in z with tensor coefficients; None is zero


@dataclass(frozen=True)
class Base:
    """A standardized base variable B: ``moments(alpha, beta, k)`` gives ``E[B^i 1{alpha < B < beta}]``,
    i = 0..k; ``boundary(z, k)`` gives ``d/dbeta`` of those at ``beta = z`` (``z^i q(z)`` for a density q)."""

    moments: PartialMoments
    boundary: Callable[[torch.Tensor, int], list[torch.Tensor]]


def _gaussian_boundary(z: torch.Tensor, order: int) -> list[torch.Tensor]:
    """``z^i phi(z)``; zero beyond the clamp of the partial moments (phi underflows there in float64 and float32)."""
    density = pdf(z.clamp(-Z_LIMIT, Z_LIMIT))
    values = [density]
    for _ in range(order):
        values.append(values[-1] * z)
    return values


GAUSSIAN = Base(interval_moments, _gaussian_boundary)


@cache
def max_base(n: int) -> Base:
    """The max of n iid standard normals (max-pooling), by interpolation in cumulative tables."""
    return Base(max_interval_moments(n), max_interval_slopes(n))


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


def compose_affine(coefficients: Polynomial, shift: torch.Tensor, scale: torch.Tensor) -> Coefficients:
    """Coefficients in z of ``p(shift + scale z)`` (binomial expansion): tensors, floats for constants, None
    for zero."""
    result: Coefficients = [None for _ in coefficients]
    for i, c in enumerate(coefficients):
        if c == 0:
            continue
        for k in range(i + 1):
            term = _scaled(c * math.comb(i, k), _power(shift, i - k), _power(scale, k))
            result[k] = _add(result[k], term)  # a float for a constant term
    return result


def multiply(p: Coefficients, q: Coefficients) -> Coefficients:
    out: Coefficients = [None for _ in range(len(p) + len(q) - 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            if a is not None and b is not None:
                out[i + j] = _add(out[i + j], a * b)
    return out


def dot(coefficients: Coefficients, moments: list[torch.Tensor]) -> torch.Tensor | None:
    total = None
    for c, moment in zip(coefficients, moments, strict=False):
        if c is not None:
            total = _add(total, c * moment)
    return total


def _derivative(coefficients: Polynomial) -> list[float]:
    return [k * c for k, c in enumerate(coefficients)][1:] or [0.0]


def _times_z(coefficients: Coefficients) -> Coefficients:
    return [None, *coefficients]


def _degree(coefficients: Coefficients) -> int:
    return max((k for k, c in enumerate(coefficients) if c is not None), default=0)


def evaluate_piecewise(x: torch.Tensor, breakpoints: Sequence[float], pieces: Sequence[Polynomial]) -> torch.Tensor:
    """f(x) for the piecewise polynomial (``pieces[j]`` on ``(breakpoints[j-1], breakpoints[j])``)."""
    value = _evaluate(pieces[0], x)
    for breakpoint, piece in zip(breakpoints, pieces[1:], strict=True):
        value = torch.where(x < breakpoint, value, _evaluate(piece, x))
    return value


def _evaluate(coefficients: Polynomial, x: torch.Tensor) -> torch.Tensor:
    return sum(c * x**k for k, c in enumerate(coefficients)) + torch.zeros_like(x)


def _limits(mean: torch.Tensor, std: torch.Tensor, breakpoints: Sequence[float]
            ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Standardized limits ``(alpha_j, beta_j)`` of every piece; None for an unbounded side."""
    edges = [None, *((b - mean) / std for b in breakpoints), None]
    return list(itertools.pairwise(edges))


def _partial_moments(base: Base, alpha: torch.Tensor | None, beta: torch.Tensor | None, like: torch.Tensor,
                     order: int) -> list[torch.Tensor]:
    lower = torch.full_like(like, -Z_LIMIT) if alpha is None else alpha
    upper = torch.full_like(like, Z_LIMIT) if beta is None else beta
    return base.moments(lower, upper, order)


def centered_piecewise(mean: torch.Tensor, std: torch.Tensor, breakpoints: Sequence[float],
                       pieces: Sequence[Polynomial], reference: torch.Tensor, base: Base = GAUSSIAN,
                       orders: int = 2) -> tuple[torch.Tensor, ...]:
    """``E[(g(X) - c)^k]`` for k = 1..orders (2 or 3), piecewise-polynomial g and ``X = mean + std B``,
    c = reference, B the standard normal by default (module docstring).
    ``pieces[j]`` holds on ``(breakpoints[j-1], breakpoints[j])``, the outer pieces unbounded."""
    assert len(pieces) == len(breakpoints) + 1
    sums: list[torch.Tensor | None] = [None] * orders
    for coefficients, (alpha, beta) in zip(pieces, _limits(mean, std, breakpoints), strict=True):
        poly = _centered(coefficients, mean, std, reference)
        powers = [poly]
        for _ in range(orders - 1):
            powers.append(multiply(powers[-1], poly))
        moments = _partial_moments(base, alpha, beta, mean, _degree(powers[-1]))
        sums = [_add(total, dot(power, moments)) for total, power in zip(sums, powers, strict=True)]
    return tuple(sums)


def _centered(coefficients: Polynomial, mean: torch.Tensor, std: torch.Tensor, reference: torch.Tensor
              ) -> Coefficients:
    """``p(mean + std z) - reference`` in z."""
    poly = compose_affine(coefficients, mean, std)
    poly[0] = -reference if poly[0] is None else poly[0] - reference
    return poly


def centered_piecewise_derivatives(mean: torch.Tensor, std: torch.Tensor, breakpoints: Sequence[float],
                                   pieces: Sequence[Polynomial], reference: torch.Tensor, base: Base = GAUSSIAN
                                   ) -> tuple[torch.Tensor, ...]:
    """``(first, second, d first/dm, d first/ds, d second/dm, d second/ds)`` for the first two centred moments
    of :func:`centered_piecewise` (c held fixed; module docstring)."""
    first = second = None
    d_first = [None, None]  # d/dm, d/ds
    d_second = [None, None]
    limits = _limits(mean, std, breakpoints)
    for coefficients, (alpha, beta) in zip(pieces, limits, strict=True):
        poly = _centered(coefficients, mean, std, reference)
        square = multiply(poly, poly)
        slope = compose_affine(_derivative(coefficients), mean, std)  # p'(mean + std z)
        twice = [None if c is None else 2 * c for c in multiply(poly, slope)]  # (p^2 - ...)' = 2 (p - c) p'
        inside = [slope, _times_z(slope), twice, _times_z(twice)]
        order = max(_degree(square), *(_degree(c) for c in inside))
        moments = _partial_moments(base, alpha, beta, mean, order)
        first, second = _add(first, dot(poly, moments)), _add(second, dot(square, moments))
        for k, terms in enumerate((slope, _times_z(slope))):
            d_first[k] = _add(d_first[k], dot(terms, moments))
        for k, terms in enumerate((twice, _times_z(twice))):
            d_second[k] = _add(d_second[k], dot(terms, moments))
        for limit, sign in ((alpha, -1.0), (beta, 1.0)):  # Leibniz's limit terms
            if limit is None:
                continue
            rate = base.boundary(limit, order)
            for derivatives, integrand in ((d_first, poly), (d_second, square)):
                at_limit = dot(integrand, rate)
                if at_limit is None:
                    continue
                at_limit = (-sign / std) * at_limit  # d limit/dm = -1/s
                derivatives[0] = _add(derivatives[0], at_limit)
                derivatives[1] = _add(derivatives[1], at_limit * limit)  # d limit/ds = -limit/s
    zero = torch.zeros_like(mean)
    return tuple(zero if t is None else t for t in (first, second, *d_first, *d_second))


def centered_gradients(first: torch.Tensor, derivatives: Sequence[torch.Tensor], raw_var: torch.Tensor,
                       var: torch.Tensor, std: torch.Tensor, grads: Sequence[torch.Tensor | None]
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``(mean, var)`` inputs, for an output ``mean = c + first``, ``var = max(second -
    first^2, 0)`` (raw value ``raw_var``) whose centred moments have the ``derivatives`` ``(d first/dm,
    d first/ds, d second/dm, d second/ds)`` at ``std = safe_std(var)``."""
    d_first_m, d_first_s, d_second_m, d_second_s = derivatives
    grad_mean, grad_var = grads
    grad_m = grad_s = None
    if grad_mean is not None:
        grad_m, grad_s = grad_mean * d_first_m, grad_mean * d_first_s
    if grad_var is not None:
        passed = torch.where(raw_var >= 0, grad_var, torch.zeros_like(grad_var))  # the clamp at 0
        grad_m = _add(grad_m, passed * (d_second_m - 2 * first * d_first_m))
        grad_s = _add(grad_s, passed * (d_second_s - 2 * first * d_first_s))
    return grad_m, _variance_gradient(grad_s, var, std)


def _variance_gradient(grad_std: torch.Tensor | None, var: torch.Tensor, std: torch.Tensor) -> torch.Tensor | None:
    """``d/dvar`` from ``d/dstd`` through ``std = safe_std(var)`` (no gradient below its floor)."""
    if grad_std is None:
        return None
    floor = torch.finfo(var.dtype).tiny ** 0.5  # safe_std's
    return torch.where(var >= floor, grad_std / (2 * std), torch.zeros_like(grad_std))
