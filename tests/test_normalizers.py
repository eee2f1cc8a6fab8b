"""The normalizer modules' building blocks against plain PyTorch expressions."""

from __future__ import annotations

import pytest
import torch

from graphnorm.normalizers import channel_affine


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (2, 3, 4, 5)])
def test_channel_affine_matches_broadcasting_and_has_exact_gradients(shape) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    view = (1, 3) + (1,) * (len(shape) - 2)
    torch.testing.assert_close(channel_affine(x, scale, shift), x * scale.reshape(view) + shift.reshape(view))
    assert torch.autograd.gradcheck(channel_affine, (x, scale, shift))
