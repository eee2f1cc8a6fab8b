"""Learned (Bayesian) normalization noise (graphnorm.noise): its initialisation against BatchNorm's own noise
(Monte Carlo), its sampling against its stated moments (Monte Carlo), its KL term against torch.distributions,
and the API around it: convert(noise="learned"), kl_divergence, predict, the CLI option. The output moments of
noisy normalizers are checked against Monte Carlo in tests/rules/cases.py (the learned-noise cases)."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch.distributions import Normal
from torch.distributions import kl_divergence as reference_kl

import graphnorm
from graphnorm import InputStats
from graphnorm.cli import main
from graphnorm.noise import LearnedNoise
from graphnorm.normalizers import batch_noise
from graphnorm.zoo import DigitsCNN

DRAWS = 400_000


@pytest.mark.parametrize("virtual_batch", [4, 8, 32])
def test_the_initial_posterior_has_the_spread_of_batchnorm_noise(virtual_batch) -> None:
    """Initialised at batch M, ``Var[log s]`` and ``E[t^2]`` equal those of BatchNorm's noise of batch M, drawn
    by :func:`batch_noise` (the Gamma/Gaussian construction of batch statistics)."""
    torch.manual_seed(0)
    scale, shift = batch_noise(DRAWS, 1, virtual_batch, torch.zeros(1, dtype=torch.float64))
    noise = LearnedNoise(1, virtual_batch)
    sigma_s, sigma_t = noise.log_sigma_scale.exp().item(), noise.log_sigma_shift.exp().item()
    assert sigma_s**2 == pytest.approx(scale.log().var().item(), rel=0.02)
    assert sigma_t**2 == pytest.approx(shift.square().mean().item(), rel=0.02)


def test_samples_have_the_stated_moments() -> None:
    torch.manual_seed(1)
    noise = LearnedNoise(3, 16)
    with torch.no_grad():
        noise.log_sigma_scale.copy_(torch.log(torch.tensor([0.05, 0.3, 0.8])))
        noise.log_sigma_shift.copy_(torch.log(torch.tensor([0.1, 0.5, 1.5])))
    scale, shift = noise.sample(DRAWS, torch.zeros((), dtype=torch.float32))
    first, second, shift_second = noise.moments()
    torch.testing.assert_close(scale.mean(0), first.detach(), rtol=0.01, atol=0)
    torch.testing.assert_close(scale.square().mean(0), second.detach(), rtol=0.02, atol=0)
    torch.testing.assert_close(shift.square().mean(0), shift_second.detach(), rtol=0.02, atol=0)
    assert abs((scale * shift).mean().item()) < 0.02  # independent


def test_samples_are_reparameterized() -> None:
    noise = LearnedNoise(2, 16)
    scale, shift = noise.sample(5, torch.zeros(()))
    (scale.sum() + shift.sum()).backward()
    assert noise.log_sigma_scale.grad.abs().sum() > 0 and noise.log_sigma_shift.grad.abs().sum() > 0


def test_kl_equals_torch_distributions_and_is_zero_at_the_prior() -> None:
    """The closed form against torch.distributions' Gaussian KL (log scale and shift), zero when the posterior
    is its prior (the initialisation), and independent of the normalizer's gamma (finite for gamma = 0)."""
    noise = LearnedNoise(3, 8, prior_batch=16)
    with torch.no_grad():
        noise.log_sigma_scale.copy_(torch.log(torch.tensor([0.1, 0.4, 1.2])))
        noise.log_sigma_shift.copy_(torch.log(torch.tensor([0.3, 0.05, 2.0])))
    sigma_s, sigma_t = noise.log_sigma_scale.exp().detach(), noise.log_sigma_shift.exp().detach()
    lambda_s, lambda_t = noise.prior_scale_std, noise.prior_shift_std
    scale, prior_scale = torch.var(batch_noise(DRAWS, 1, 16, torch.zeros(1, dtype=torch.float64))[0].log()), lambda_s**2
    assert prior_scale == pytest.approx(scale.item(), rel=0.02)  # the prior is BatchNorm's noise of batch 16
    expected = (reference_kl(Normal(-sigma_s**2 / 2, sigma_s), Normal(-lambda_s**2 / 2, lambda_s))
                + reference_kl(Normal(torch.zeros(3), sigma_t), Normal(0.0, lambda_t))).sum()
    torch.testing.assert_close(noise.kl().detach(), expected)
    assert LearnedNoise(5, 12).kl().item() == pytest.approx(0.0, abs=1e-5)


def test_kl_is_finite_on_a_residual_network_with_zero_initialised_gammas() -> None:
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    assert any((m.weight == 0).all() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    converted = graphnorm.convert(model, InputStats.standard(3), input_shape=(1, 3, 32, 32), noise="learned",
                                  agreement_samples=0)
    kl = graphnorm.kl_divergence(converted)
    assert math.isfinite(kl.item()) and abs(kl.item()) < 1e-3
    converted.train()
    logits = converted(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["analytic", "reparam"])
def test_convert_with_learned_noise(mode) -> None:
    """Training draws noise per example (outputs vary, gradients reach the posterior through the loss and the KL
    term), eval is the deterministic posterior-mean network (= the noise-free conversion), export drops the
    noise."""
    model = DigitsCNN().eval()
    stats = InputStats.standard(1)
    noisy = graphnorm.convert(model, stats, input_shape=(1, 1, 8, 8), mode=mode, noise="learned",
                              stochastic_batch=16, agreement_samples=0)
    plain = graphnorm.convert(model, stats, input_shape=(1, 1, 8, 8), mode=mode, agreement_samples=0)
    learned = [m for m in noisy.modules() if isinstance(m, LearnedNoise)]
    assert len(learned) == 2 and all(m.virtual_batch == 16 for m in learned)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(noisy.eval()(x), plain.eval()(x))
    noisy.train()
    first, second = noisy(x), noisy(x)
    assert not torch.allclose(first, second)
    kl = graphnorm.kl_divergence(noisy)
    assert kl.dim() == 0 and abs(kl.item()) < 1e-4  # the posterior starts at its prior
    (first.square().mean() + kl / 1000).backward()
    assert all(m.log_sigma_scale.grad is not None and m.log_sigma_scale.grad.abs().sum() > 0 for m in learned)
    assert noisy.graphnorm_log.rewritten and graphnorm.kl_divergence(plain).item() == 0.0


def test_learned_noise_defaults_to_batch_32_and_refuses_bad_kinds() -> None:
    model = DigitsCNN().eval()
    converted = graphnorm.convert(model, InputStats.standard(1), input_shape=(1, 1, 8, 8), noise="learned",
                                  agreement_samples=0)
    assert {m.virtual_batch for m in converted.modules() if isinstance(m, LearnedNoise)} == {32}
    with pytest.raises(graphnorm.GraphnormError, match="noise must be one of batch, learned"):
        graphnorm.convert(model, InputStats.standard(1), input_shape=(1, 1, 8, 8), noise="gaussian")


def test_predict_averages_noisy_passes_and_restores_the_mode() -> None:
    model = DigitsCNN().eval()
    converted = graphnorm.convert(model, InputStats.standard(1), input_shape=(1, 1, 8, 8), noise="learned",
                                  stochastic_batch=8, agreement_samples=0).eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    predictive = graphnorm.predict(converted, x, samples=64)
    assert not converted.training
    torch.testing.assert_close(predictive.sum(-1), torch.ones(3))
    torch.manual_seed(3)
    converted.train()
    with torch.no_grad():
        manual = torch.stack([torch.softmax(converted(x), -1) for _ in range(64)]).mean(0)
    torch.testing.assert_close(predictive, manual)
    assert converted.training  # restored to what it was
    mean_network = graphnorm.predict(converted, x, samples=0)
    with torch.no_grad():
        torch.testing.assert_close(mean_network, torch.softmax(converted.eval()(x), -1))
    entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1)  # noqa: E731
    assert math.isfinite(entropy(predictive).sum().item())


def test_cli_noise_option(tmp_path) -> None:
    result = CliRunner().invoke(main, ["convert", "graphnorm.zoo:DigitsCNN", str(tmp_path / "x.pt"), "--input-shape",
                                       "1,1,8,8", "--noise", "learned", "--stochastic-batch", "16", "-q"])
    assert result.exit_code == 0, result.output
    from graphnorm.loading import load_converted

    rebuilt = load_converted(tmp_path / "x.pt")
    assert sum(isinstance(m, LearnedNoise) for m in rebuilt.modules()) == 2


def test_the_statistics_follow_the_learned_noise() -> None:
    """In training, the statistics program reads the posterior's current spread (downstream normalizers see
    the variance the noise adds), and its gradient reaches the posterior parameters."""
    model = DigitsCNN().eval()
    converted = graphnorm.convert(model, InputStats.standard(1), input_shape=(1, 1, 8, 8), noise="learned",
                                  stochastic_batch=16, agreement_samples=0).train()
    program = converted.statistics_program
    before = [t.detach().clone() for t in program.train()(*converted.statistics_inputs())]
    first = next(m for m in converted.modules() if isinstance(m, LearnedNoise))
    with torch.no_grad():
        first.log_sigma_shift.add_(1.0)
    after = program.train()(*converted.statistics_inputs())
    assert any(not torch.allclose(a, b) for a, b in zip(after, before, strict=True))
    sum(t.sum() for t in after).backward()
    assert first.log_sigma_shift.grad is not None and first.log_sigma_shift.grad.abs().sum() > 0
