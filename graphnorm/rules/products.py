"""Moment rule of the matrix product (``matmul``, ``@``, ``bmm``), with a constant or between two activations.

With a constant matrix C: ``mean = m C``, ``var = v (C*C)`` (AP2: the summed units independent).
Between two activations A and B (attention's ``q @ k.transpose(-2, -1)``, ``attn @ v``), assumed independent
of each other and unit by unit: ``E[sum_k a_k b_k] = sum_k m_a m_b`` and
``Var = sum_k [(v_a + m_a^2)(v_b + m_b^2) - m_a^2 m_b^2]``, exact for independent inputs. Queries and keys
computed from one input are correlated; that covariance is neglected (as at residual adds, MATH.md section 6).
"""

from __future__ import annotations

from ..moments import Moments
from . import moment_rule
from .layout import from_units
from .structural import constant_of_one_sample


@moment_rule("matmul")
def matmul(a, b, **_) -> Moments:
    """``a @ b`` per sample (batch dims of the sample broadcast as in ``torch.matmul``)."""
    if isinstance(a, Moments) and isinstance(b, Moments):
        ma, va, mb, vb = a.unit_mean, a.unit_var, b.unit_mean, b.unit_var
        mean = ma @ mb
        var = (va + ma * ma) @ (vb + mb * mb) - (ma * ma) @ (mb * mb)
        return from_units(mean, var.clamp_min(0))
    if isinstance(a, Moments):
        c = constant_of_one_sample(b, a)
        return from_units(a.unit_mean @ c, a.unit_var @ (c * c))
    c = constant_of_one_sample(a, b)
    return from_units(c @ b.unit_mean, (c * c) @ b.unit_var)
