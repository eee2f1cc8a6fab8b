"""The modules that the BatchNorm rewrites insert (MATH.md sections 3 and 4).

- :class:`AnalyticNorm`: ``gamma (x - mu_b)/sqrt(var_b + eps) + beta`` with ``(mu_b, var_b)`` the analytic
  moments of its input, put in place by the converted model before every forward (Shekhovtsov & Flach 2018).
- :class:`FixedBatchNorm`: BatchNorm that always uses its (analytic, data-free) running statistics.
- :class:`NormalizedWeight` / :class:`NormalizedBias`: ``torch.nn.utils.parametrize`` parametrizations that
  fold a BatchNorm into the Linear/Conv before it: ``W_eff = gamma W/sigma(W)``,
  ``b_eff = beta - gamma mu(W)/sigma(W)``, ``mu(W) = W m_in``, ``sigma(W)^2 = (W*W) v_in + eps``.
- :class:`NormPropLayer`: Normalization Propagation (Arpit et al. 2016), ``gamma (W x)/(c ||W_o||) + beta``.
- :class:`ChannelAffine`: a constant per-channel ``x * scale + shift`` (NormProp's input standardization and
  its post-ReLU correction ``(relu(u) - 0.398942)/0.583819``).
- :func:`batch_noise`: BN-equivalent multiplicative and additive noise of a virtual batch of size M
  (Shekhovtsov & Flach, ACCV 2018): ``s = sqrt(v/v_hat)``, ``t = (mu - mu_hat)/sqrt(v_hat)`` with
  ``v_hat/v ~ Gamma((M-1)/2, rate M/2)`` and ``mu_hat ~ N(mu, v/M)`` independent; drawn per example and
  channel, shared over spatial positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rules.kernels import kernel_moments as channel_kernel_moments

__all__ = ["AnalyticNorm", "BatchNoise", "ChannelAffine", "FixedBatchNorm", "NormPropLayer", "NormalizedBias",
           "NormalizedWeight", "ReparamState", "batch_noise"]

RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)  # 0.398942: mean of ReLU(N(0, 1))
RELU_STD = math.sqrt((1.0 - 1.0 / math.pi) / 2.0)  # 0.583819: its std


def channel_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel values ``[C]`` shaped to broadcast along dim 1 of ``like``."""
    return values.reshape((1, -1) + (1,) * (like.dim() - 2))


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` along dim 1, differentiable in all three, through PyTorch's fused eval-mode
    BatchNorm kernel (zero mean, unit variance, eps 0): one pass forward and a fused backward, where the
    broadcasting expression reduces ``grad * x`` over batch and positions in separate, slower passes."""
    unit_mean = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    unit_var = torch.ones_like(unit_mean)
    return F.batch_norm(x, unit_mean, unit_var, scale, shift, False, 0.0, 0.0)


def batch_noise(batch: int, channels: int, virtual_batch: int, like: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``s`` and shift ``t``, each ``[batch, channels]``, that turn an exact normalization into the one
    a BatchNorm of batch size ``virtual_batch`` would apply to Gaussian data: ``y = s x_norm + t``."""
    concentration = torch.full((batch, channels), (virtual_batch - 1) / 2.0, dtype=like.dtype, device=like.device)
    ratio = torch._standard_gamma(concentration) / (virtual_batch / 2.0)  # v_hat / v ~ Gamma((M-1)/2, rate M/2)
    scale = ratio.rsqrt()
    shift = -torch.randn_like(concentration) * scale / math.sqrt(virtual_batch)
    return scale, shift


def stochastic_variance_factor(virtual_batch: int) -> float:
    """``E[s^2] = E[v/v_hat] = M/(M-3)``; with ``E[t^2] = E[s^2]/M`` the output variance of a noisy
    normalization is ``gamma^2 M/(M-3) (r + 1/M)`` for a normalized input of variance r."""
    return virtual_batch / (virtual_batch - 3.0)


def _check_virtual_batch(virtual_batch: int | None) -> None:
    if virtual_batch is not None and (not isinstance(virtual_batch, int) or virtual_batch < 4):
        raise ValueError(f"stochastic_batch must be an integer >= 4 (the noise variance M/(M-3) is finite only "
                         f"then), got {virtual_batch!r}")


class AnalyticNorm(nn.Module):
    """``gamma (x - mu_b)/sqrt(var_b + eps) + beta`` along dim 1, statistics from moment propagation.

    ``weight``/``bias`` are the BatchNorm's own parameters (shared, not copied, when one BatchNorm module is
    called at several sites). ``statistics`` is set by the converted model before each forward; in training
    it carries the autograd graph back to the upstream weights. With ``stochastic_batch=M``, training adds
    :func:`batch_noise` after normalizing.
    """

    def __init__(self, num_features: int, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float,
                 stochastic_batch: int | None = None):
        super().__init__()
        _check_virtual_batch(stochastic_batch)
        self.num_features = num_features
        self.weight = weight
        self.bias = bias
        self.eps = eps
        self.stochastic_batch = stochastic_batch
        self.statistics: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is None:
            raise RuntimeError("AnalyticNorm has no statistics: call it through the model graphnorm.convert returned")
        mean, var = (t.to(x.dtype) for t in self.statistics)
        inverse_std = torch.rsqrt(var + self.eps)
        if self.training and self.stochastic_batch is not None:
            y = (x - channel_view(mean, x)) * channel_view(inverse_std, x)
            noise_scale, noise_shift = batch_noise(x.shape[0], x.shape[1], self.stochastic_batch, x)
            view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
            y = y * noise_scale.reshape(view) + noise_shift.reshape(view)
            if self.weight is not None:
                y = y * channel_view(self.weight, x)
            return y if self.bias is None else y + channel_view(self.bias, x)
        scale = inverse_std if self.weight is None else self.weight * inverse_std
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        return channel_affine(x, scale, shift)

    def __getstate__(self) -> dict:
        """Copies and pickles keep the statistics' values, not their autograd history."""
        state = dict(super().__getstate__())
        if state.get("statistics") is not None:
            state["statistics"] = tuple(t.detach() for t in state["statistics"])
        return state

    def extra_repr(self) -> str:
        noise = f", stochastic_batch={self.stochastic_batch}" if self.stochastic_batch else ""
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}{noise}"


def expected_noise_scale(virtual_batch: int) -> float:
    """``E[s] = E[(v_hat/v)^(-1/2)]`` for ``v_hat/v ~ Gamma(a = (M-1)/2, rate b = M/2)``:
    ``sqrt(b) Gamma(a - 1/2)/Gamma(a)``."""
    a, b = (virtual_batch - 1) / 2.0, virtual_batch / 2.0
    return math.sqrt(b) * math.exp(math.lgamma(a - 0.5) - math.lgamma(a))


class BatchNoise(nn.Module):
    """BatchNorm-like noise on an already normalized activation ``x = gamma x_norm + beta`` (after a folded
    layer): in training ``y = s (x - beta) + gamma t + beta`` with ``(s, t)`` from :func:`batch_noise`;
    identity in eval."""

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, stochastic_batch: int):
        super().__init__()
        _check_virtual_batch(stochastic_batch)
        self.weight = weight
        self.bias = bias
        self.stochastic_batch = stochastic_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        scale, shift = batch_noise(x.shape[0], x.shape[1], self.stochastic_batch, x)
        view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        beta = channel_view(self.bias, x) if self.bias is not None else 0.0
        gamma = channel_view(self.weight, x) if self.weight is not None else 1.0
        return scale.reshape(view) * (x - beta) + gamma * shift.reshape(view) + beta

    def extra_repr(self) -> str:
        return f"stochastic_batch={self.stochastic_batch}"


class FixedBatchNorm(nn.Module):
    """BatchNorm in eval semantics whatever the module mode: ``weight (x - running_mean)/sqrt(running_var +
    eps) + bias`` along dim 1, with running statistics that never update."""

    def __init__(self, running_mean: torch.Tensor, running_var: torch.Tensor, weight: nn.Parameter | None,
                 bias: nn.Parameter | None, eps: float):
        super().__init__()
        self.register_buffer("running_mean", running_mean.detach().clone())
        self.register_buffer("running_var", running_var.detach().clone())
        self.weight = weight
        self.bias = bias
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, eps={self.eps}, affine={self.weight is not None}"


@dataclass(eq=False)
class ReparamState:
    """What the two parametrizations of one folded layer share: its raw weight, groups and eps, and
    ``mu(W) = W m_in`` and ``sigma(W) = sqrt((W*W) v_in + eps)`` per output channel, computed (with autograd
    in training) by the converted model from the analytic moments of the layer's input before each call."""

    weight: nn.Parameter
    groups: int
    eps: float
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles keep mu and sigma's values, not their autograd history."""
        state = dict(self.__dict__)
        for name in ("mu", "sigma"):
            if state[name] is not None:
                state[name] = state[name].detach()
        return state

    def update(self, input_mean: torch.Tensor, input_var: torch.Tensor) -> None:
        self.mu, self.sigma = kernel_moments(self.weight, input_mean, input_var, self.groups, self.eps)

    def statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mu is None or self.sigma is None:
            raise RuntimeError("the folded layer has no input statistics: call it through the converted model")
        return self.mu.to(like.dtype), self.sigma.to(like.dtype)


def kernel_moments(weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel of a Linear/Conv weight ``[O, C/g, *k]`` on inputs with per-channel moments
    ``(mean, var)``: ``mu = sum_{c,k} W m_c`` and ``sigma = sqrt(sum_{c,k} W^2 v_c + eps)``."""
    mu, spread = channel_kernel_moments(weight, mean, var, groups)
    return mu, torch.sqrt(spread + eps)


class NormalizedWeight(nn.Module):
    """Parametrization ``W -> gamma W / sigma(W)`` (weight reparameterization; generalized NormProp)."""

    def __init__(self, state: ReparamState, gamma: nn.Parameter | None):
        super().__init__()
        self.state = state
        self.gamma = gamma

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        _, sigma = self.state.statistics(weight)
        scale = 1.0 / sigma if self.gamma is None else self.gamma / sigma
        return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))


class NormalizedBias(nn.Module):
    """Parametrization of the bias ``b -> beta - gamma mu(W)/sigma(W)`` (the layer's own bias cancels)."""

    def __init__(self, state: ReparamState, gamma: nn.Parameter | None, beta: nn.Parameter | None):
        super().__init__()
        self.state = state
        self.gamma = gamma
        self.beta = beta

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        mu, sigma = self.state.statistics(bias)
        shifted = -mu / sigma if self.gamma is None else -self.gamma * mu / sigma
        return shifted if self.beta is None else shifted + self.beta


class NormPropLayer(nn.Module):
    """Normalization Propagation's layer: ``gamma (W x)/(c ||W_o||_2) + beta`` with the norm over
    ``(C_in, *kernel)`` of output channel o; the wrapped layer's own bias is not used (BatchNorm cancelled it)."""

    def __init__(self, layer: nn.Module, gamma: nn.Parameter | None, beta: nn.Parameter | None, c: float):
        super().__init__()
        self.layer = layer
        self.gamma = gamma
        self.beta = beta
        self.c = c

    def effective_weight(self) -> torch.Tensor:
        weight = self.layer.weight
        norms = weight.reshape(weight.shape[0], -1).norm(dim=1)
        scale = 1.0 / (self.c * norms) if self.gamma is None else self.gamma / (self.c * norms)
        return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.beta)
        return self.layer._conv_forward(x, weight, self.beta)

    def extra_repr(self) -> str:
        return f"c={self.c}"


class ChannelAffine(nn.Module):
    """A constant ``x * scale + shift`` per channel (dim 1), or with scalars for all channels."""

    def __init__(self, scale: torch.Tensor | float, shift: torch.Tensor | float):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.get_default_dtype()).reshape(-1))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.get_default_dtype()).reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * channel_view(self.scale, x) + channel_view(self.shift, x)
