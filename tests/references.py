"""Independent references for the fast statistics pass: the plain formulas, differentiated by autograd."""

from __future__ import annotations

import pytest
import torch

from graphnorm.rules import fusion, kernels


def plain_formulas(patch: pytest.MonkeyPatch) -> None:
    """Make the statistics pass the plain formulas differentiated by autograd: every fused call its reference
    code and NormProp's norms autograd's (as under torch.compile on a GPU), the kernel moments their GEMVs
    through autograd (not the hand-written backward the fast path shares with the custom op). Use on a model
    converted with ``fusion(False)``, whose recorded program holds no fused form at all."""
    patch.setattr(torch.compiler, "is_compiling", lambda: True)
    patch.setattr(kernels, "kernel_moments_call", lambda weight, mean, var, groups, workspace=None:
                  kernels._compiled_form(weight, mean, var, groups))
    patch.setattr(fusion, "fused_call", lambda form, inputs: tuple(form.reference(*inputs)))
