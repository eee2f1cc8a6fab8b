"""Gaussian building blocks shared by the rules: cdf/pdf, interval moments, Gauss-Legendre nodes, order
statistics of the maximum, and Clark's max of two Gaussians.

All functions work elementwise on tensors and are differentiable with torch autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
import torch

from ..workspace import plain_tensors

SQRT_2PI = math.sqrt(2.0 * math.pi)
# Standardized breakpoints are clamped here: beyond it the normal pdf underflows in float64 and the cdf is
# exactly 0 or 1, so nothing is lost, and polynomials times pdf stay finite (no inf * 0).
Z_LIMIT = 40.0


def ndtr(z: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(z)


def pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / SQRT_2PI


def safe_std(var: torch.Tensor) -> torch.Tensor:
    """sqrt(var) kept away from 0 so standardized quantities stay finite (a zero variance is a point mass)."""
    tiny = torch.finfo(var.dtype).tiny ** 0.5
    return var.clamp_min(tiny).sqrt()


def interval_probability(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """P(alpha < Z < beta) for standard normal Z, accurate in both tails (no 1 - 1 cancellation)."""
    upper_tail = alpha > 0
    return torch.where(upper_tail, ndtr(-alpha) - ndtr(-beta), ndtr(beta) - ndtr(alpha))


def interval_moments(alpha: torch.Tensor, beta: torch.Tensor, max_order: int) -> list[torch.Tensor]:
    """Partial moments ``M_k = int_alpha^beta z^k phi(z) dz`` of the standard normal, k = 0..max_order.

    Recurrence (integration by parts, ``z phi(z) = -phi'(z)``):
    ``M_0 = Phi(beta) - Phi(alpha)``, ``M_1 = phi(alpha) - phi(beta)``,
    ``M_k = (k-1) M_{k-2} + alpha^{k-1} phi(alpha) - beta^{k-1} phi(beta)``.
    Infinite limits are passed as +-Z_LIMIT.
    """
    alpha = alpha.clamp(-Z_LIMIT, Z_LIMIT)
    beta = beta.clamp(-Z_LIMIT, Z_LIMIT)
    pdf_alpha, pdf_beta = pdf(alpha), pdf(beta)
    moments = [interval_probability(alpha, beta), pdf_alpha - pdf_beta]
    for k in range(2, max_order + 1):
        moments.append(
            (k - 1) * moments[k - 2] + alpha ** (k - 1) * pdf_alpha - beta ** (k - 1) * pdf_beta
        )
    return moments[: max_order + 1]


@cache
def _leggauss(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(nodes)


def constant_like(key: tuple, like: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The constant ``make()`` in the dtype and device of ``like``, converted once per (key, dtype, device)
    (a statistics program evaluates these at every step). Not kept for fake or traced tensors."""
    full_key = (*key, like.dtype, like.device)
    value = _CONSTANTS.get(full_key)  # (under torch.compile: a constant of the graph)
    if value is None:
        value = make().to(dtype=like.dtype, device=like.device)
        if plain_tensors(like):
            _CONSTANTS[full_key] = value
    return value


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def legendre_nodes(nodes: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [-1, 1], in the dtype and device of ``like``."""
    table = constant_like(("legendre", nodes), like,
                          lambda: torch.stack([torch.as_tensor(t) for t in _leggauss(nodes)]))
    return table[0], table[1]


@cache
def _max_density_grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid ``x_j`` and weights ``w_j`` with ``E[g(M)] ~ sum_j w_j g(x_j)`` for M the max of n iid N(0, 1):
    trapezoid rule on the density ``n phi(x) Phi(x)^(n-1)`` over [-12, 12], step 0.0005 (float64)."""
    if n < 1:
        raise ValueError(f"a max over {n} values is undefined")
    x = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    weights = n * pdf(x) * ndtr(x) ** (n - 1) * (x[1] - x[0])
    weights[0] *= 0.5
    weights[-1] *= 0.5
    return x, weights


def max_quadrature(n: int, like: torch.Tensor, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_max_density_grid` in the dtype/device of ``like``, every ``stride``-th point (weights
    rescaled), for integrals of functions over the max of n iid standard normals."""
    x, weights = _max_density_grid(n)
    if stride > 1:
        x, weights = x[::stride], weights[::stride] * stride
    return x.to(like), weights.to(like)


@cache
def _max_cumulative_moments(n: int, max_order: int) -> torch.Tensor:
    """``C[k, j] = int_{-12}^{x_j} x^k q_n(x) dx`` on the grid of :func:`_max_density_grid` (cumulative
    trapezoid), k = 0..max_order, for q_n the density of the max of n iid standard normals."""
    x, _ = _max_density_grid(n)
    density = n * pdf(x) * ndtr(x) ** (n - 1)
    step = (x[1] - x[0]).item()
    rows = []
    for k in range(max_order + 1):
        values = x**k * density
        increments = 0.5 * (values[1:] + values[:-1]) * step
        rows.append(torch.cat([torch.zeros(1, dtype=x.dtype), torch.cumsum(increments, 0)]))
    return torch.stack(rows)


def _max_table_position(z: torch.Tensor, last: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where z falls in the cumulative tables of :func:`_max_cumulative_moments`: the segment index, the
    fraction into it, and where the clamps to the tables' range leave z free (the interpolant's slope there)."""
    step = 24.0 / last
    raw = (z.clamp(-12.0, 12.0) + 12.0) / step
    position = raw.clamp(0, last - 1e-6)
    index = position.floor().long()
    free = (z >= -12.0) & (z <= 12.0) & (raw <= last - 1e-6)  # where torch.clamp passes a gradient
    return index, position - index, free


def max_interval_moments(n: int) -> Callable[[torch.Tensor, torch.Tensor, int], list[torch.Tensor]]:
    """Like :func:`interval_moments`, for M the max of n iid standard normals instead of Z:
    ``int_alpha^beta x^k q_n(x) dx`` by linear interpolation in precomputed cumulative tables."""

    def moments(alpha: torch.Tensor, beta: torch.Tensor, max_order: int) -> list[torch.Tensor]:
        table = constant_like(("max", n), alpha, lambda: _max_cumulative_moments(n, 4))
        last = table.shape[1] - 1

        def cumulative(z: torch.Tensor) -> torch.Tensor:
            index, frac, _ = _max_table_position(z, last)
            low, high = table[:, index], table[:, index + 1]
            return low + frac.unsqueeze(0) * (high - low)

        values = cumulative(beta) - cumulative(alpha)
        return [values[k] for k in range(max_order + 1)]

    return moments


def max_interval_slopes(n: int) -> Callable[[torch.Tensor, int], list[torch.Tensor]]:
    """The derivatives of :func:`max_interval_moments` with respect to its upper limit, at z: the slopes of the
    interpolated tables (zero where z is clamped to their range), ``~ z^k q_n(z)``."""

    def slopes(z: torch.Tensor, max_order: int) -> list[torch.Tensor]:
        table = constant_like(("max", n), z, lambda: _max_cumulative_moments(n, 4))
        last = table.shape[1] - 1
        index, _, free = _max_table_position(z, last)
        rate = (table[:, index + 1] - table[:, index]) * (free.to(z.dtype) * (last / 24.0)).unsqueeze(0)
        return [rate[k] for k in range(max_order + 1)]

    return slopes


@cache
def max_order_statistics(n: int) -> tuple[float, float]:
    """Mean ``E_n`` and variance ``V_n`` of the maximum of n iid N(0, 1).

    Exact up to the quadrature of :func:`_max_density_grid` (error < 1e-9). n = 9 gives (1.485013, 0.357353).
    """
    x, weights = _max_density_grid(n)
    first = (weights * x).sum().item()
    second = (weights * x * x).sum().item()
    return first, second - first * first


def max_third_cumulant(n: int) -> float:
    """Third central moment of the maximum of n iid N(0, 1) (its skewness, since ``V_n`` is its variance,
    is ``T_n / V_n^1.5``: 0 for n = 1, 0.14 for n = 2, 0.38 for n = 9); same quadrature as
    :func:`max_order_statistics`."""
    x, weights = _max_density_grid(n)
    first = (weights * x).sum()
    return (weights * (x - first) ** 3).sum().item()


def clark_max(m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of max(X1, X2) for independent Gaussians (Clark 1961), shift-stabilized.

    ``t = sqrt(v1 + v2)``, ``d = (m1 - m2)/t``; mean ``m1 Phi(d) + m2 Phi(-d) + t phi(d)``,
    second moment ``(v1 + m1^2) Phi(d) + (v2 + m2^2) Phi(-d) + (m1 + m2) t phi(d)``. Computed relative to
    ``(m1 + m2)/2`` so that large means do not cancel in the variance.
    """
    center = 0.5 * (m1 + m2)
    a, b = m1 - center, m2 - center
    t = safe_std(v1 + v2)
    d = (a - b) / t
    p, q, density = ndtr(d), ndtr(-d), pdf(d)
    mean = a * p + b * q + t * density
    second = (v1 + a * a) * p + (v2 + b * b) * q + (a + b) * t * density
    return mean + center, (second - mean * mean).clamp_min(0)
