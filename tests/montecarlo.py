"""Monte-Carlo reference for moment rules: draw Gaussian inputs, run the real module, estimate moments with
their standard errors, and compare.

Tolerances: an estimate is accepted when the analytic value lies within ``SIGMAS`` standard errors of it, plus
an optional relative allowance for rules that approximate on purpose (each case states why). Standard errors
are computed from independent draws (one per sample; positions within a sample are averaged first, so their
correlation cannot make the test overconfident). With 6 sigmas a correct rule fails with probability ~2e-9
per comparison; the seeds are fixed, so runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DRAWS = 100_000
CHUNK = 10_000
SIGMAS = 6.0


@dataclass
class Estimate:
    mean: torch.Tensor
    var: torch.Tensor
    se_mean: torch.Tensor
    se_var: torch.Tensor


class _Sums:
    """Running sums of per-draw first (a) and second (b) moments, for the delta-method standard error of
    ``var = E[b] - E[a]^2``: influence ``psi = (b - E b) - 2 E[a] (a - E a)``."""

    def __init__(self) -> None:
        self.n = 0
        self.a = self.b = self.aa = self.bb = self.ab = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.n += a.shape[0]
        self.a = self.a + a.sum(0)
        self.b = self.b + b.sum(0)
        self.aa = self.aa + (a * a).sum(0)
        self.bb = self.bb + (b * b).sum(0)
        self.ab = self.ab + (a * b).sum(0)

    def estimate(self) -> Estimate:
        n = self.n
        mean_a, mean_b = self.a / n, self.b / n
        var_a = (self.aa / n - mean_a**2).clamp_min(0)
        var_b = (self.bb / n - mean_b**2).clamp_min(0)
        cov_ab = self.ab / n - mean_a * mean_b
        var_psi = (var_b + 4 * mean_a**2 * var_a - 4 * mean_a * cov_ab).clamp_min(0)
        return Estimate(mean_a, (mean_b - mean_a**2).clamp_min(0), (var_a / n).sqrt(), (var_psi / n).sqrt())


def gaussian_batches(mean, std, sample_shape, draws: int = DRAWS, seed: int = 0, dtype=torch.float64):
    """Batches of x ~ N(mean_c, std_c^2) per channel (dim 1), independent over channels and positions."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(mean, dtype=dtype).reshape((1, -1) + (1,) * (len(sample_shape) - 1))
    std = torch.as_tensor(std, dtype=dtype).reshape((1, -1) + (1,) * (len(sample_shape) - 1))
    done = 0
    while done < draws:
        count = min(CHUNK, draws - done)
        yield mean + std * torch.randn((count, *sample_shape), generator=generator, dtype=dtype)
        done += count


def estimate(outputs, *, per_unit: bool, crop: int = 0) -> Estimate:
    """Moments of the outputs of a stream of batches: per unit, or per channel (dim 1) over positions."""
    sums = _Sums()
    for y in outputs:
        if crop and y.dim() > 2:
            index = (slice(None), slice(None), *tuple(slice(crop, size - crop) for size in y.shape[2:]))
            y = y[index]
        if per_unit or y.dim() == 2:
            a, b = y, y * y
        else:
            flat = y.reshape(y.shape[0], y.shape[1], -1)
            a, b = flat.mean(-1), (flat * flat).mean(-1)
        sums.add(a, b)
    return sums.estimate()


def monte_carlo(fn: Callable[[torch.Tensor], torch.Tensor], mean, std, sample_shape, *, per_unit: bool = False,
                crop: int = 0, draws: int = DRAWS, seed: int = 20240) -> Estimate:
    """Moments of ``fn(x)`` over Gaussian draws. The global RNG (dropout masks, ...) is reseeded with another
    seed than the data's, so the module's own randomness cannot be correlated with the inputs."""
    torch.manual_seed(seed + 7919)
    with torch.no_grad():
        return estimate((fn(x) for x in gaussian_batches(mean, std, sample_shape, draws, seed)),
                        per_unit=per_unit, crop=crop)


def assert_close(mean: torch.Tensor, var: torch.Tensor, reference: Estimate, *, rtol: float = 0.0,
                 atol: float = 1e-10, label: str = "") -> None:
    """Analytic (mean, var) within SIGMAS standard errors (+ rtol of the std / var) of the MC estimate."""
    mean, var = mean.detach().to(torch.float64), var.detach().to(torch.float64)
    assert mean.shape == reference.mean.shape, f"{label}: shape {tuple(mean.shape)} vs MC {tuple(reference.mean.shape)}"
    std = reference.var.sqrt()
    mean_gap = (mean - reference.mean).abs()
    mean_tol = SIGMAS * reference.se_mean + rtol * std + atol
    var_gap = (var - reference.var).abs()
    var_tol = SIGMAS * reference.se_var + 2 * rtol * reference.var + atol
    worst_mean = (mean_gap / mean_tol).max().item()
    worst_var = (var_gap / var_tol).max().item()
    assert worst_mean <= 1.0, (
        f"{label}: mean off by {worst_mean:.2f}x tolerance\n analytic {mean.flatten()[:8].tolist()}\n"
        f" MC       {reference.mean.flatten()[:8].tolist()}")
    assert worst_var <= 1.0, (
        f"{label}: var off by {worst_var:.2f}x tolerance\n analytic {var.flatten()[:8].tolist()}\n"
        f" MC       {reference.var.flatten()[:8].tolist()}")
