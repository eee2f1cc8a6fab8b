"""The hand-written backward of the kernel moments against autograd of the plain formula, and gradcheck."""

from __future__ import annotations

import pytest
import torch

from graphnorm.rules.kernels import kernel_moments


def plain(weight, mean, var, groups):
    out_channels, per_group = weight.shape[:2]
    kernel = weight.reshape(groups, out_channels // groups, per_group, -1)
    out_mean = (kernel.sum(-1) * mean.reshape(groups, 1, per_group)).sum(-1).reshape(-1)
    out_var = ((kernel**2).sum(-1) * var.reshape(groups, 1, per_group)).sum(-1).reshape(-1)
    return out_mean, out_var


@pytest.mark.parametrize(("shape", "groups"), [
    ((6, 4, 3, 3), 1), ((6, 2, 3, 3), 2), ((4, 1, 5), 4), ((8, 1, 3, 3), 4), ((5, 7), 1), ((4, 3, 2, 2, 2), 1)])
def test_kernel_moments_forward_and_backward(shape, groups) -> None:
    generator = torch.Generator().manual_seed(0)
    in_channels = shape[1] * groups
    weight = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(in_channels, generator=generator, dtype=torch.float64, requires_grad=True)
    var = torch.rand(in_channels, generator=generator, dtype=torch.float64, requires_grad=True)
    ours, reference = kernel_moments(weight, mean, var, groups), plain(weight, mean, var, groups)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)
    probe = torch.randn(2, shape[0], generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((ours[0] * probe[0]).sum() + (ours[1] * probe[1]).sum(), (weight, mean, var))
    expected = torch.autograd.grad((reference[0] * probe[0]).sum() + (reference[1] * probe[1]).sum(),
                                   (weight, mean, var))
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda w, m, v: kernel_moments(w, m, v, groups), (weight, mean, var))


@pytest.mark.parametrize("used", [0, 1])
def test_kernel_moments_gradient_of_one_output(used) -> None:
    """Only the mean (or only the variance) reaches the loss: the other output's gradient is absent, not a
    zero tensor, and the backward still matches autograd of the plain formula."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 3, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    var = torch.rand(3, generator=generator, dtype=torch.float64, requires_grad=True)
    ours = kernel_moments(weight, mean, var)[used].square().sum()
    reference = plain(weight, mean, var, 1)[used].square().sum()
    grads = torch.autograd.grad(ours, (weight, mean, var), allow_unused=True)
    expected = torch.autograd.grad(reference, (weight, mean, var), allow_unused=True)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)


def test_the_compiler_form_of_the_backward_equals_the_eager_form(monkeypatch) -> None:
    """Under torch.compile the backward is traced in a broadcast-and-reduce form (fused by inductor); it must
    give the eager GEMV form's gradients (checked here in eager mode by pretending to compile)."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    var = torch.rand(4, generator=generator, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 6, generator=generator, dtype=torch.float64)

    def gradients():
        out_mean, out_var = kernel_moments(weight, mean, var, 2)
        return torch.autograd.grad((out_mean * probe[0]).sum() + (out_var * probe[1]).sum(), (weight, mean, var))

    eager = gradients()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for a, b in zip(gradients(), eager, strict=True):
        torch.testing.assert_close(a, b)
