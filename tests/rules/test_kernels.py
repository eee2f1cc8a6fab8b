"""The hand-written backward of the kernel moments against autograd of the plain formula, and gradcheck."""

from __future__ import annotations

import pytest
import torch

from graphnorm.rules.kernels import KernelMomentsCall, _compiled_form, kernel_moments, kernel_moments_call


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


@pytest.mark.parametrize("form", ["custom op", "GEMVs through autograd"])
def test_the_compiler_forms_equal_the_eager_form(form: str, monkeypatch) -> None:
    """Under torch.compile a recorded program's kernel moments are the custom op on a CPU and the GEMVs through
    autograd on a GPU (graphnorm.rules.kernels.kernel_moments_call); both must give the eager form's values and
    gradients (checked here in eager mode, pretending to compile for the first)."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    var = torch.rand(4, generator=generator, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 6, generator=generator, dtype=torch.float64)

    def gradients(call):
        out_mean, out_var = call(weight, mean, var, 2)
        grads = torch.autograd.grad((out_mean * probe[0]).sum() + (out_var * probe[1]).sum(), (weight, mean, var))
        return out_mean, out_var, *grads

    eager = gradients(kernel_moments_call)
    if form == "custom op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled = gradients(kernel_moments_call)
    else:
        compiled = gradients(_compiled_form)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)


def _site(shape=(6, 4, 3, 3), groups=1, seed=3):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(shape[1] * groups, generator=generator, dtype=torch.float64, requires_grad=True)
    var = torch.rand(shape[1] * groups, generator=generator, dtype=torch.float64, requires_grad=True)
    return weight, mean, var


def _loss(out_mean, out_var, scale=1.0):
    return (out_mean * scale).square().sum() + (out_var * torch.arange(out_var.numel(), dtype=out_var.dtype)).sum()


@pytest.mark.parametrize("groups", [1, 2])
def test_a_recorded_call_with_its_workspace_equals_the_custom_op(groups) -> None:
    """What a recorded program calls (graphnorm.rules.kernels.KernelMomentsCall: the squared weight kept from
    forward to backward, the weight gradient written into that memory) gives the custom op's values and
    gradients, step after step, with the weight changing in place in between (as an optimizer changes it)."""
    weight, mean, var = _site((6, 2, 3, 3), groups)
    call = KernelMomentsCall(groups)
    for step in range(3):
        with torch.no_grad():
            weight.mul_(1.0 + 0.1 * step)
        got = call(weight, mean, var)
        want = kernel_moments(weight, mean, var, groups)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        grads = torch.autograd.grad(_loss(*got), (weight, mean, var))
        expected = torch.autograd.grad(_loss(*want), (weight, mean, var))
        for a, b in zip(grads, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_a_gradient_the_caller_keeps_is_never_overwritten() -> None:
    """A weight gradient handed out from the workspace and still held (here: returned by autograd.grad, the
    only contribution to the weight) is not reused by the next step: it keeps its values."""
    weight, mean, var = _site()
    call = KernelMomentsCall(1)
    first = torch.autograd.grad(_loss(*call(weight, mean, var)), weight)[0]
    kept = first.clone()
    second = torch.autograd.grad(_loss(*call(weight, mean, var), scale=3.0), weight)[0]
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    assert not torch.allclose(first, second)


def test_two_forwards_before_one_backward_and_a_retained_graph() -> None:
    """Two forwards of one site before a single backward (two losses), and a second backward through a retained
    graph: the later forward takes the workspace, the earlier one and the second backward recompute what they
    need; every gradient equals the custom op's."""
    weight, mean, var = _site()
    call = KernelMomentsCall(1)
    total = _loss(*call(weight, mean, var)) + _loss(*call(weight, mean * 2, var), scale=0.5)
    reference = _loss(*kernel_moments(weight, mean, var)) + _loss(*kernel_moments(weight, mean * 2, var), scale=0.5)
    expected = torch.autograd.grad(reference, (weight, mean, var))
    got = torch.autograd.grad(total, (weight, mean, var), retain_graph=True)
    again = torch.autograd.grad(total, (weight, mean, var))
    for a, b, c in zip(got, again, expected, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=0)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=0)


def test_the_workspace_starts_empty_in_copies_and_pickles() -> None:
    import copy
    import pickle

    weight, mean, var = _site()
    call = KernelMomentsCall(1)
    _loss(*call(weight, mean, var)).backward()
    assert call.workspace._buffer is not None
    for clone in (copy.deepcopy(call), pickle.loads(pickle.dumps(call))):
        assert clone.workspace._buffer is None and clone.groups == 1
