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
- :class:`Calibration`: the per-channel correction that makes a converted trained network compute what the
  original computed in eval (MATH.md section 7): ``mu(W) = m_a(W) + kappa s_a(W)``, ``sigma(W) = rho s_a(W)``
  with ``kappa``, ``rho`` fixed at conversion. Identity (``kappa = 0``, ``rho = 1``) when not calibrated.
- :func:`batch_noise`: BN-equivalent multiplicative and additive noise of a virtual batch of size M
  (Shekhovtsov & Flach, ACCV 2018): ``s = sqrt(v/v_hat)``, ``t = (mu - mu_hat)/sqrt(v_hat)`` with
  ``v_hat/v ~ Gamma((M-1)/2, rate M/2)`` and ``mu_hat ~ N(mu, v/M)`` independent; drawn per example and
  channel, shared over spatial positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .noise import LearnedNoise
from .workspace import plain_tensors

__all__ = ["AnalyticNorm", "BatchNoise", "Calibration", "ChannelAffine", "FixedBatchNorm", "NormPropLayer",
           "NormalizedBias", "NormalizedWeight", "ReparamState", "batch_noise", "scaled_layer"]

RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)  # 0.398942: mean of ReLU(N(0, 1))
RELU_STD = math.sqrt((1.0 - 1.0 / math.pi) / 2.0)  # 0.583819: its std


def channel_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel values ``[C]`` shaped to broadcast along dim 1 of ``like``."""
    return values.reshape((1, -1) + (1,) * (like.dim() - 2))


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` along dim 1, differentiable in all three, through PyTorch's fused eval-mode
    BatchNorm kernel (zero mean, unit variance, eps 0): one pass forward and a fused backward, where the
    broadcasting expression reduces ``grad * x`` over batch and positions in separate, slower passes.
    ``scale`` and ``shift`` share one dtype: x's, or float32 for a float16/bfloat16 x (:func:`affine_dtype`)."""
    unit_mean = torch.zeros(x.shape[1], dtype=scale.dtype, device=x.device)
    unit_var = torch.ones_like(unit_mean)
    return F.batch_norm(x, unit_mean, unit_var, scale, shift, False, 0.0, 0.0)


def affine_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of per-channel normalization parameters applied to ``x``: float32 for a float16/bfloat16
    activation (PyTorch's BatchNorm kernels take low-precision input with float32 parameters, as under autocast:
    the output stays in x's dtype without rounding the parameters), else x's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def batch_noise(batch: int, channels: int, virtual_batch: int, like: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``s`` and shift ``t``, each ``[batch, channels]``, that turn an exact normalization into the one
    a BatchNorm of batch size ``virtual_batch`` would apply to Gaussian data: ``y = s x_norm + t``."""
    dtype = torch.promote_types(like.dtype, torch.float32)  # drawn in float32 or better, used in like's dtype
    concentration = torch.full((batch, channels), (virtual_batch - 1) / 2.0, dtype=dtype, device=like.device)
    ratio = torch._standard_gamma(concentration) / (virtual_batch / 2.0)  # v_hat / v ~ Gamma((M-1)/2, rate M/2)
    scale = ratio.rsqrt()
    shift = -torch.randn_like(concentration) * scale / math.sqrt(virtual_batch)
    return scale.to(like.dtype), shift.to(like.dtype)


NOISE_KINDS = ("batch", "learned")


def make_noise(kind: str, channels: int, virtual_batch: int | None, like: torch.Tensor | None
               ) -> LearnedNoise | None:
    """The learned posterior for ``kind="learned"`` (initialised at BatchNorm's noise of ``virtual_batch``);
    None for BatchNorm's fixed noise (:func:`batch_noise`) or no noise."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    if kind == "batch" or virtual_batch is None:
        return None
    if channels == 0:
        raise ValueError("learned noise needs the normalizer's channel count (an affine BatchNorm)")
    return LearnedNoise(channels, virtual_batch, like)


def draw_noise(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` ``[batch, C]`` for a noisy normalizer: from its learned posterior, or BatchNorm's noise."""
    if module.noise is not None:
        return module.noise.sample(x.shape[0], x)
    return batch_noise(x.shape[0], x.shape[1], module.stochastic_batch, x)


def noise_moments(module: nn.Module) -> tuple[torch.Tensor | float, torch.Tensor | float, torch.Tensor | float]:
    """``(E[s], E[s^2], E[t^2])`` of a noisy normalizer's noise (``E[t] = 0``, ``E[s t] = 0``)."""
    if module.noise is not None:
        return module.noise.moments()
    second = stochastic_variance_factor(module.stochastic_batch)
    return expected_noise_scale(module.stochastic_batch), second, second / module.stochastic_batch


def stochastic_variance_factor(virtual_batch: int) -> float:
    """``E[s^2] = E[v/v_hat] = M/(M-3)``; with ``E[t^2] = E[s^2]/M`` the output variance of a noisy
    normalization is ``gamma^2 M/(M-3) (r + 1/M)`` for a normalized input of variance r."""
    return virtual_batch / (virtual_batch - 3.0)


def _check_virtual_batch(virtual_batch: int | None) -> None:
    if virtual_batch is not None and (not isinstance(virtual_batch, int) or virtual_batch < 4):
        raise ValueError(f"stochastic_batch must be an integer >= 4 (the noise variance M/(M-3) is finite only "
                         f"then), got {virtual_batch!r}")


class Calibration(nn.Module):
    """Per-channel calibration of analytic statistics to target statistics (MATH.md section 7), with buffers
    in the dtype and on the device of ``like`` (a parameter of the normalized layer), if given.

    A normalizer's analytic statistics are a mean ``m_a(W)`` and a scale ``s_a(W)`` (the analytic std with
    eps, ``sqrt(v_a + eps)``; NormProp's ``c ||W_o||``). Calibrated, it normalizes with

        ``mu(W) = m_a(W) + kappa s_a(W)``,   ``sigma(W) = rho s_a(W)``,

    where ``kappa = (m_t - m_a(W0))/s_a(W0)`` and ``rho = sqrt(v_t + eps)/s_a(W0)`` are buffers fitted once, at
    conversion, to target statistics ``(m_t, v_t)`` (a BatchNorm's running statistics, or statistics measured on
    data). At ``W = W0`` the normalizer is exactly BatchNorm in eval with the target statistics; as the weights
    move, the statistics follow them through ``m_a`` and ``s_a``. Both ``mu`` and ``sigma`` scale with the
    producing layer's weights, the symmetry BatchNorm has. Assumption: the gap between the analytic and the
    real statistics, measured in units of ``s_a``, stays constant while the weights move.
    """

    def __init__(self, channels: int, like: torch.Tensor | None = None):
        super().__init__()
        factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.register_buffer("shift", torch.zeros(channels, **factory))  # kappa
        self.register_buffer("scale", torch.ones(channels, **factory))  # rho

    def fit(self, analytic_mean: torch.Tensor, analytic_scale: torch.Tensor, target_mean: torch.Tensor,
            target_var: torch.Tensor, target_eps: float) -> None:
        """Set ``kappa`` and ``rho`` (computed in float64) so that :meth:`apply` gives the target statistics for
        these analytic statistics. A channel whose analytic scale is 0 keeps the identity."""
        m_a, s_a = analytic_mean.detach().double(), analytic_scale.detach().double()
        target_mean, target_var = target_mean.detach().to(m_a), target_var.detach().to(m_a)
        live = s_a > 0
        safe = torch.where(live, s_a, torch.ones_like(s_a))
        kappa = torch.where(live, (target_mean - m_a) / safe, torch.zeros_like(s_a))
        rho = torch.where(live, torch.sqrt(target_var.clamp_min(0) + target_eps) / safe, torch.ones_like(s_a))
        with torch.no_grad():
            self.shift.copy_(kappa)
            self.scale.copy_(rho)

    def apply(self, analytic_mean: torch.Tensor, analytic_scale: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma) = (m_a + kappa s_a, rho s_a)``."""
        shift, scale = self.shift.to(analytic_scale.dtype), self.scale.to(analytic_scale.dtype)
        return analytic_mean + shift * analytic_scale, scale * analytic_scale


class AnalyticNorm(nn.Module):
    """``gamma (x - mu)/sigma + beta`` along dim 1, statistics from moment propagation.

    ``(mu, sigma) = (m_a, sqrt(v_a + eps))`` from the analytic moments ``(m_a, v_a)`` of the input, corrected by
    :attr:`calibration` when the model was calibrated (identity otherwise). ``weight``/``bias`` are the
    BatchNorm's own parameters (shared, not copied, when one BatchNorm module is called at several sites).
    ``statistics = (m_a, v_a)`` is set by the converted model before each forward; in training it carries the
    autograd graph back to the upstream weights. With ``stochastic_batch=M``, training adds :func:`batch_noise`
    after normalizing.
    """

    def __init__(self, num_features: int, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float,
                 stochastic_batch: int | None = None, noise: str = "batch"):
        super().__init__()
        _check_virtual_batch(stochastic_batch)
        self.num_features = num_features
        self.weight = weight
        self.bias = bias
        self.eps = eps
        self.stochastic_batch = stochastic_batch
        self.noise = make_noise(noise, num_features, stochastic_batch, weight if weight is not None else bias)
        self.calibration = Calibration(num_features, weight if weight is not None else bias)
        self.statistics: tuple[torch.Tensor, torch.Tensor] | None = None

    def noise_kl(self) -> torch.Tensor:
        """The KL term of this normalizer's learned noise (:meth:`graphnorm.noise.LearnedNoise.kl`)."""
        return self.noise.kl()

    def normalizing_statistics(self, statistics: tuple[torch.Tensor, torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` per channel: the calibrated analytic mean and std (with eps), from ``statistics``
        (the input's analytic ``(mean, var)``) or, without them, from the last refresh's :attr:`statistics`."""
        if statistics is None:
            statistics = self.statistics
        if statistics is None:
            raise RuntimeError("AnalyticNorm has no statistics: call it through the model graphnorm.convert returned")
        mean, var = statistics
        return self.calibration.apply(mean, torch.sqrt(var + self.eps))

    def eval_affine(self, statistics: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel ``x * scale + shift`` this normalizer computes without noise."""
        mu, sigma = self.normalizing_statistics(statistics)
        scale = 1.0 / sigma if self.weight is None else self.weight / sigma
        shift = -mu * scale if self.bias is None else self.bias - mu * scale
        return scale, shift

    def forward(self, x: torch.Tensor, mean: torch.Tensor | None = None, var: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Normalize ``x`` with its input's analytic ``(mean, var)`` (the converted graph passes them; without
        them, the last refresh's :attr:`statistics`). Statistics in float32 or better, applied in x's dtype."""
        statistics = None if mean is None or var is None else (mean, var)
        if self.training and self.stochastic_batch is not None:
            mu, sigma = (t.to(x.dtype) for t in self.normalizing_statistics(statistics))
            y = (x - channel_view(mu, x)) / channel_view(sigma, x)
            noise_scale, noise_shift = draw_noise(self, x)
            view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
            y = y * noise_scale.reshape(view) + noise_shift.reshape(view)
            if self.weight is not None:
                y = y * channel_view(self.weight.to(x.dtype), x)
            return y if self.bias is None else y + channel_view(self.bias.to(x.dtype), x)
        scale, shift = self.eval_affine(statistics)
        dtype = affine_dtype(x)
        return channel_affine(x, scale.to(dtype), shift.to(dtype))

    def __getstate__(self) -> dict:
        """Copies and pickles keep the statistics' values, not their autograd history."""
        state = dict(super().__getstate__())
        if state.get("statistics") is not None:
            state["statistics"] = tuple(t.detach() for t in state["statistics"])
        return state

    def extra_repr(self) -> str:
        noise = f", stochastic_batch={self.stochastic_batch}" if self.stochastic_batch else ""
        noise += ", learned noise" if self.noise is not None else ""
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

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, stochastic_batch: int,
                 noise: str = "batch"):
        super().__init__()
        _check_virtual_batch(stochastic_batch)
        self.weight = weight
        self.bias = bias
        self.stochastic_batch = stochastic_batch
        reference = weight if weight is not None else bias
        channels = reference.shape[0] if reference is not None else 0
        self.noise = make_noise(noise, channels, stochastic_batch, reference)

    def noise_kl(self) -> torch.Tensor:
        """The KL term of this noise's learned posterior (:meth:`graphnorm.noise.LearnedNoise.kl`)."""
        return self.noise.kl()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        scale, shift = draw_noise(self, x)
        view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        beta = channel_view(self.bias, x) if self.bias is not None else 0.0
        gamma = channel_view(self.weight, x) if self.weight is not None else 1.0
        return scale.reshape(view) * (x - beta) + gamma * shift.reshape(view) + beta

    def extra_repr(self) -> str:
        return f"stochastic_batch={self.stochastic_batch}" + (", learned" if self.noise is not None else "")


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
        # float16/bfloat16 inputs normalize with float32 statistics and affine (batch_norm's mixed type), the rest
        # in their own dtype.
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        weight, bias = (None if p is None else p.to(dtype) for p in (self.weight, self.bias))
        return F.batch_norm(x, self.running_mean.to(dtype), self.running_var.to(dtype), weight, bias, False, 0.0,
                            self.eps)

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, eps={self.eps}, affine={self.weight is not None}"


@dataclass(eq=False)
class ReparamState:
    """What the two parametrizations of one folded layer share: its groups, eps, output shape, calibration, and
    ``mu(W)``, ``sigma(W)`` per output channel. The converted model computes, before each call (with autograd in
    training), the channel mean ``m`` and variance ``v`` of the layer's output without its bias from the
    analytic moments of its input (per channel ``m = W m_in``, ``v = (W*W) v_in``); then
    ``(mu, sigma) = calibration.apply(m, sqrt(v + eps))``, which is ``(m, sqrt(v + eps))`` uncalibrated."""

    groups: int
    eps: float
    out_shape: tuple[int, ...]
    calibration: Calibration
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles keep mu and sigma's values, not their autograd history."""
        state = dict(self.__dict__)
        for name in ("mu", "sigma"):
            if state[name] is not None:
                state[name] = state[name].detach()
        return state

    def normalizing(self, raw_mean: torch.Tensor, raw_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` from the channel moments of the layer's output without its bias."""
        return self.calibration.apply(raw_mean, torch.sqrt(raw_var + self.eps))

    def update(self, raw_mean: torch.Tensor, raw_var: torch.Tensor) -> None:
        """Set ``(mu, sigma)`` from the channel moments of the layer's output without its bias."""
        self.mu, self.sigma = self.normalizing(raw_mean, raw_var)

    def statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mu is None or self.sigma is None:
            raise RuntimeError("the folded layer has no input statistics: call it through the converted model")
        return self.mu.to(like.dtype), self.sigma.to(like.dtype)


class NormalizedWeight(nn.Module):
    """Parametrization ``W -> gamma W / sigma(W)`` (weight reparameterization; generalized NormProp). It owns
    the layer's :class:`Calibration` (so its buffers are saved once, with the weight's parametrization)."""

    def __init__(self, state: ReparamState, gamma: nn.Parameter | None):
        super().__init__()
        self.state = state
        self.gamma = gamma
        self.calibration = state.calibration

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """``gamma / sigma`` per output channel."""
        return 1.0 / sigma if self.gamma is None else self.gamma.to(sigma.dtype) / sigma

    def normalize(self, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``gamma W / sigma`` per output channel."""
        return weight * _output_channels(self.scale(sigma.to(weight.dtype)), weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        _, sigma = self.state.statistics(weight)
        return self.normalize(weight, sigma)


class NormalizedBias(nn.Module):
    """Parametrization of the bias ``b -> beta - gamma mu(W)/sigma(W)`` (the layer's own bias cancels)."""

    def __init__(self, state: ReparamState, gamma: nn.Parameter | None, beta: nn.Parameter | None):
        super().__init__()
        self.state = state
        self.gamma = gamma
        self.beta = beta

    def normalize(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``beta - gamma mu / sigma``."""
        shifted = -mu / sigma if self.gamma is None else -self.gamma.to(mu.dtype) * mu / sigma
        return shifted if self.beta is None else shifted + self.beta.to(mu.dtype)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        mu, sigma = self.state.statistics(bias)
        return self.normalize(mu, sigma)


class NormPropLayer(nn.Module):
    """Normalization Propagation's layer: ``gamma (W x)/(c ||W_o||_2) + beta`` with the norm over
    ``(C_in, *kernel)`` of output channel o; the wrapped layer's own bias is not used (BatchNorm cancelled it).

    NormProp's implicit statistics of ``W x`` are mean 0 and std ``s_a = c ||W_o||`` (standardized,
    independent inputs). Calibrated (:class:`Calibration`), the layer normalizes with
    ``(mu, sigma) = (kappa s_a, rho s_a)`` instead: ``gamma (W x - mu)/sigma + beta``."""

    def __init__(self, layer: nn.Module, gamma: nn.Parameter | None, beta: nn.Parameter | None, c: float):
        super().__init__()
        self.layer = layer
        self.gamma = gamma
        self.beta = beta
        self.c = c
        self.calibration = Calibration(layer.weight.shape[0], layer.weight)

    def implicit_scale(self) -> torch.Tensor:
        """``s_a = c ||W_o||`` per output channel."""
        weight = self.layer.weight
        return self.c * weight.reshape(weight.shape[0], -1).norm(dim=1)

    def scale_and_shift(self, norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output channel, the ``gamma/sigma`` that multiplies ``W x`` and the bias ``beta - gamma mu/sigma``
        (``beta``, or 0 without it, when uncalibrated: ``mu = 0``), from the weight's row ``norms`` if given."""
        scale_a = self.implicit_scale() if norms is None else self.c * norms
        mu, sigma = self.calibration.apply(torch.zeros_like(scale_a), scale_a)
        scale = 1.0 / sigma if self.gamma is None else self.gamma / sigma
        bias = -mu * scale
        return scale, bias if self.beta is None else bias + self.beta

    def effective_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_eff = gamma W/sigma`` and ``b_eff = beta - gamma mu/sigma`` (:meth:`scale_and_shift`)."""
        scale, bias = self.scale_and_shift()
        return self.layer.weight * _output_channels(scale, self.layer.weight), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms, weight = norms_and_weight(self.layer.weight)
        return scaled_layer(self.layer, x, weight, *self.scale_and_shift(norms))

    def extra_repr(self) -> str:
        return f"c={self.c}"


def add_into(gradient: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Where a backward may add its own term to the ``gradient`` autograd handed it for a tensor shaped like
    ``like``: that gradient itself when nothing else holds it (contiguous, its only reference, no
    ``create_graph``), so the weight gradient of a statistic goes into the layer's own weight gradient without a
    weight-sized tensor of its own or autograd's addition of the two; else a copy (or zeros)."""
    if gradient is None:
        return torch.zeros_like(like, memory_format=torch.contiguous_format)
    if (torch.is_grad_enabled() or not gradient.is_contiguous() or gradient._use_count() > 1
            or gradient.shape != like.shape):
        return gradient.clone(memory_format=torch.contiguous_format).reshape(like.shape)
    return gradient


class _NormsAndWeight(torch.autograd.Function):
    """``(||W_o||, W)``: the norms per output channel and the weight itself, for the layer to use, so that one
    backward receives both gradients and returns ``dW = g_W + (g_o/||W_o||) W`` (0 for a zero row, as
    autograd's), added in place into the layer's own gradient (:func:`add_into`)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norms = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)
        ctx.save_for_backward(weight, norms)
        ctx.set_materialize_grads(False)
        return norms, weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad_norms: torch.Tensor | None, grad_weight: torch.Tensor | None) -> torch.Tensor:
        weight, norms = ctx.saved_tensors
        total = add_into(grad_weight, weight)
        if grad_norms is not None:
            scale = torch.where(norms > 0, grad_norms / norms, torch.zeros_like(norms)).unsqueeze(1)
            rows = weight.reshape(weight.shape[0], -1)
            if torch.is_grad_enabled():  # create_graph: differentiable
                return total + (rows * scale).view(weight.shape)
            total.view(rows.shape).addcmul_(rows, scale)
        return total


def norms_and_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``||W_o||_2`` per output channel of a Linear/Conv weight, and the weight for the layer to use
    (:class:`_NormsAndWeight`, in eager mode; plain autograd under torch.compile or for traced tensors)."""
    if torch.compiler.is_compiling() or not plain_tensors(weight):
        return weight.reshape(weight.shape[0], -1).norm(dim=1), weight
    return _NormsAndWeight.apply(weight)


def _output_channels(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel ``values[O]`` shaped to broadcast against a Linear/Conv weight ``[O, ...]``."""
    return values.reshape((-1,) + (1,) * (weight.dim() - 1))


def scaled_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
                 ) -> torch.Tensor:
    """The Linear/Conv ``layer`` on ``x`` with weight ``scale[o] W[o]`` and bias ``shift``, the product taken on
    the smaller side: on the weight (``W * scale``: a weight-sized tensor, and its gradient, at every step) or
    on the output (``scale * (W x) + shift``, through BatchNorm's fused per-channel kernel), whichever has fewer
    values for this input. The same function either way; at the batch sizes graphnorm is for the output is the
    smaller (ResNet-18 at 64x64 and batch 1: 0.6 M output values against 11 M weights)."""
    linear = isinstance(layer, nn.Linear)
    if _output_size(layer, x, weight) < weight.numel():
        out = F.linear(x, weight) if linear else layer._conv_forward(x, weight, None)
        dtype = affine_dtype(out)
        return channel_affine(out, scale.to(dtype), shift.to(dtype))
    effective = weight * _output_channels(scale.to(weight.dtype), weight)
    bias = shift.to(weight.dtype)
    return F.linear(x, effective, bias) if linear else layer._conv_forward(x, effective, bias)


def _output_size(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> int:
    """The number of values ``layer(x)`` with ``weight`` has (from the shapes alone; a parametrized layer's own
    ``weight`` is not read)."""
    if isinstance(layer, nn.Linear):
        return x.numel() // weight.shape[1] * weight.shape[0]
    size = x.shape[0] * (weight.shape[1] * layer.groups if isinstance(layer, nn.modules.conv._ConvTransposeNd)
                         else weight.shape[0])
    kernel = weight.shape[2:]
    for d, length in enumerate(x.shape[2:]):
        padding = 0 if isinstance(layer.padding, str) else layer.padding[d]
        if layer.padding == "same":
            out = length
        elif isinstance(layer, nn.modules.conv._ConvTransposeNd):
            out = (length - 1) * layer.stride[d] - 2 * padding + layer.dilation[d] * (kernel[d] - 1) + 1
        else:
            out = (length + 2 * padding - layer.dilation[d] * (kernel[d] - 1) - 1) // layer.stride[d] + 1
        size *= max(out, 1)
    return size


class ChannelAffine(nn.Module):
    """A constant ``x * scale + shift`` per channel (dim 1), or with scalars for all channels."""

    def __init__(self, scale: torch.Tensor | float, shift: torch.Tensor | float):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.get_default_dtype()).reshape(-1))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.get_default_dtype()).reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * channel_view(self.scale, x) + channel_view(self.shift, x)
