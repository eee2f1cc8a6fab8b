"""Learned (Bayesian) normalization noise (Shekhovtsov & Flach, ACCV 2018, "Stochastic normalizations as
Bayesian learning"; docs/math.md, "Learned noise").

A normalizer with noise computes ``y = gamma (s x_norm + t) + beta`` with a random per-example, per-channel scale
``s`` and shift ``t`` (shared over positions). That is the normalizer with random effective parameters
``gamma' = gamma s`` and ``beta' = beta + gamma t``: a distribution over the scale and bias, which the paper
reads as a variational posterior ``q(gamma', beta')`` of Bayesian learning. BatchNorm's own batch noise (virtual
batch M, :func:`graphnorm.normalizers.batch_noise`) is one fixed such posterior; :class:`LearnedNoise` learns it:

- posterior, per channel c: ``log s ~ N(-sigma_s^2/2, sigma_s^2)`` (so ``E[s] = 1``: the posterior mean network
  is the noise-free one used in eval) and ``t ~ N(0, sigma_t^2)``, independent, with learned ``log sigma_s``,
  ``log sigma_t``. Initialised at BatchNorm's noise of batch M: ``sigma_s^2 = Var[log s_BN] =
  psi'((M-1)/2)/4`` and ``sigma_t^2 = E[t_BN^2] = 1/(M-3)``.
- prior, per channel, relative to the point estimates ``(gamma, beta)``: ``log s ~ N(-lambda_s^2/2,
  lambda_s^2)`` and ``t ~ N(0, lambda_t^2)`` with the spread of BatchNorm's noise of a prior batch size
  (default: the initial M), so the KL is 0 at initialisation and the posterior leaves BatchNorm's noise only
  where the data pays for it.
  A prior on ``gamma'`` itself (e.g. ``log|gamma'| ~ N(0, 1)``) would be infinite at the zero-initialised
  gammas of residual networks (timm's ``zero_init_last``); a prior on the noise is scale-free.
- :meth:`LearnedNoise.kl`: ``KL(q || p)`` in closed form (two Gaussian KLs: in log space for the scale),
  summed over channels; :func:`kl_divergence` sums it over a model. The training objective is the variational
  free energy restricted to scale and bias: ``E_q[-log p(D | gamma', beta', W)] + KL / N_train`` per example.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = ["LearnedNoise", "kl_divergence", "predict"]


def _trigamma(x: float) -> float:
    """``psi'(x)`` for ``x >= 1.5`` by recurrence to ``x >= 6`` and the asymptotic series (error < 1e-9)."""
    total = 0.0
    while x < 6.0:
        total += 1.0 / (x * x)
        x += 1.0
    inverse = 1.0 / x
    square = inverse * inverse
    return total + inverse + square / 2 + inverse * square * (1 / 6 - square * (1 / 30 - square / 42))


def batch_noise_log_scale_var(virtual_batch: int) -> float:
    """``Var[log s]`` of BatchNorm's noise of batch M: ``s = (v_hat/v)^(-1/2)`` with ``v_hat/v ~ Gamma((M-1)/2,
    rate M/2)``, and ``Var[log Gamma(a, b)] = psi'(a)``, so ``psi'((M-1)/2)/4``."""
    return _trigamma((virtual_batch - 1) / 2.0) / 4.0


class LearnedNoise(nn.Module):
    """Per-channel variational posterior of the normalization noise (module docstring): parameters
    ``log_sigma_scale`` and ``log_sigma_shift`` ``[C]``, initialised at BatchNorm's noise of ``virtual_batch``;
    priors ``log s ~ N(-lambda_s^2/2, lambda_s^2)``, ``t ~ N(0, lambda_t^2)`` with BatchNorm's spread for
    ``prior_batch``
    (default ``virtual_batch``)."""

    def __init__(self, channels: int, virtual_batch: int, like: torch.Tensor | None = None,
                 prior_batch: int | None = None):
        super().__init__()
        factory = {"dtype": torch.float32 if like is None else torch.promote_types(like.dtype, torch.float32),
                   "device": None if like is None else like.device}
        self.log_sigma_scale = nn.Parameter(
            torch.full((channels,), 0.5 * math.log(batch_noise_log_scale_var(virtual_batch)), **factory))
        self.log_sigma_shift = nn.Parameter(torch.full((channels,), -0.5 * math.log(virtual_batch - 3.0), **factory))
        self.virtual_batch = virtual_batch
        self.prior_batch = virtual_batch if prior_batch is None else prior_batch
        self.prior_scale_std = math.sqrt(batch_noise_log_scale_var(self.prior_batch))
        self.prior_shift_std = 1.0 / math.sqrt(self.prior_batch - 3.0)

    def sample(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale ``s`` and shift ``t``, each ``[batch, C]``, reparameterized (differentiable in the sigmas), drawn
        in float32 or better and returned in ``like``'s dtype."""
        sigma_s, sigma_t = self.log_sigma_scale.exp(), self.log_sigma_shift.exp()
        noise = torch.randn((2, batch, sigma_s.shape[0]), dtype=sigma_s.dtype, device=sigma_s.device)
        scale = torch.exp(sigma_s * noise[0] - 0.5 * sigma_s * sigma_s)
        return scale.to(like.dtype), (sigma_t * noise[1]).to(like.dtype)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(E[s], E[s^2], E[t^2])`` per channel: ``1``, ``exp(sigma_s^2)``, ``sigma_t^2`` (``E[t] = 0``, s and
        t independent)."""
        variance = torch.exp(2 * self.log_sigma_scale)
        return torch.ones_like(variance), torch.exp(variance), torch.exp(2 * self.log_sigma_shift)

    def kl(self) -> torch.Tensor:
        """``KL(q || p)`` summed over channels: the Gaussian KL of ``log s ~ N(-sigma_s^2/2, sigma_s^2)`` against
        ``N(-lambda_s^2/2, lambda_s^2)`` plus that of ``t ~ N(0, sigma_t^2)`` against ``N(0, lambda_t^2)``."""
        sigma_s, sigma_t = self.log_sigma_scale.exp(), self.log_sigma_shift.exp()
        lambda_s = self.prior_scale_std
        scale_kl = _gaussian_kl(-0.5 * sigma_s * sigma_s, sigma_s, -0.5 * lambda_s * lambda_s, lambda_s)
        shift_kl = _gaussian_kl(torch.zeros_like(sigma_t), sigma_t, 0.0, self.prior_shift_std)
        return (scale_kl + shift_kl).sum()

    def extra_repr(self) -> str:
        return (f"{self.log_sigma_scale.shape[0]}, initial virtual batch {self.virtual_batch}, prior: BatchNorm "
                f"noise of batch {self.prior_batch}")


def _gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_mean: float, prior_std: float) -> torch.Tensor:
    """``KL(N(mean, std^2) || N(prior_mean, prior_std^2))``."""
    ratio = std / prior_std
    log_ratio = torch.log(ratio.clamp_min(torch.finfo(std.dtype).tiny))
    return -log_ratio + 0.5 * (ratio * ratio + ((mean - prior_mean) / prior_std) ** 2 - 1)


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """The KL term of the variational objective: the sum of :meth:`LearnedNoise.kl` over every normalizer of
    ``model`` with learned noise (a differentiable scalar; 0 when there is none). Add it to the mean loss of a
    batch with weight ``1/N_train``."""
    terms = [module.noise_kl() for module in model.modules()
             if isinstance(getattr(module, "noise", None), LearnedNoise) and hasattr(module, "noise_kl")]
    if not terms:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=None if parameter is None else parameter.device)
    return torch.stack(terms).sum()


def predict(model: nn.Module, x: torch.Tensor, samples: int = 16,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The predictive distribution: the mean of ``transform(model(x))`` over ``samples`` noisy forward passes
    (training-mode noise, no gradients), ``transform`` softmax over the last dim by default (class
    probabilities). The model's train/eval flags are restored afterwards. With ``samples=0``, the posterior mean
    network (eval mode) alone."""
    if transform is None:
        def transform(logits: torch.Tensor) -> torch.Tensor:
            return torch.softmax(logits.float(), dim=-1)
    flags = [(module, module.training) for module in model.modules()]
    try:
        with torch.no_grad():
            if samples <= 0:
                return transform(model.eval()(x))
            model.train()
            total = transform(model(x))
            for _ in range(samples - 1):
                total = total + transform(model(x))
            return total / samples
    finally:
        for module, training in flags:
            module.training = training
