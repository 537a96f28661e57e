"""Toy denoisers with exact scores, for tests and demos of distillation methods.

Analytic posterior means E[x0 | x~] of Gaussian and Gaussian-mixture data under VE noise
x~ = x0 + sigma~ eps (Tweedie; docs/algorithms.md §0.2), wrapped as ``Denoiser``s on a VP
schedule, plus a small MLP denoiser (EDM preconditioning, Karras et al. 2022, Table 1) to
play a trainable generator or fake score. Samples are flat vectors: shape (B, D); each
denoiser carries ``sample_shape = (D,)``. Conditioning is ignored (one class).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hyperscale.diffusion.schedule import DiscreteVP, Prediction
from hyperscale.models.denoiser import BaseDenoiser


def gaussian_posterior_mean(x: Tensor, sigma: Tensor | float, mean: Tensor, cov: Tensor) -> Tensor:
    """E[x0 | x~ = x] for x0 ~ N(mean, cov): x (..., D), sigma scalar or (...,), mean (D,), cov (D, D)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    eye = torch.eye(cov.shape[0], dtype=x.dtype, device=x.device)
    # Gaussian conditioning: mean + cov (cov + sigma^2 I)^-1 (x - mean)
    gain = cov @ torch.linalg.inv(cov + sigma[..., None, None] ** 2 * eye)
    return mean + (gain @ (x - mean)[..., None])[..., 0]


def gmm_posterior_mean(x: Tensor, sigma: Tensor | float, means: Tensor, stds: Tensor,
                       weights: Tensor) -> Tensor:
    """E[x0 | x~ = x] for an isotropic mixture: x (B, D), sigma scalar or (B,), means (K, D),
    stds (K,), weights (K,) summing to one."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    var = stds.to(x.dtype) ** 2 + sigma[:, None] ** 2  # (B, K): variance of x~ given component k
    diff = x[:, None, :] - means.to(x.dtype)  # (B, K, D)
    # responsibilities r_k ∝ w_k N(x; mu_k, var_k I)
    logp = (weights.to(x.dtype).log() - 0.5 * diff.pow(2).sum(-1) / var
            - 0.5 * x.shape[1] * var.log())
    r = logp.softmax(dim=1)
    # per-component Tweedie mean: mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)
    comp = means.to(x.dtype) + (stds.to(x.dtype) ** 2 / var)[..., None] * diff
    return (r[..., None] * comp).sum(1)


class _ToyDenoiser(BaseDenoiser):
    """x0-predicting denoiser on flat samples (B, D); ``raw`` sees the VE point x~ = x_t / alpha_t."""

    def __init__(self, schedule: DiscreteVP, dim: int):
        super().__init__(schedule, Prediction.x0)
        self.sample_shape = (dim,)

    def null_cond(self, cond: Tensor) -> Tensor:
        return cond

    def raw(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        ab = self.schedule.abar(t).to(x_t.dtype)
        return self.denoise(x_t / ab.sqrt()[:, None], ((1 - ab) / ab).sqrt())

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError


class GaussianMixtureDenoiser(_ToyDenoiser):
    """Exact denoiser of an isotropic Gaussian mixture: means (K, D), stds (K,), weights (K,)."""

    def __init__(self, schedule: DiscreteVP, means: Tensor, stds: Tensor, weights: Tensor | None = None):
        super().__init__(schedule, means.shape[1])
        k = means.shape[0]
        self.register_buffer("means", means.clone())
        self.register_buffer("stds", stds.clone().expand(k))
        self.register_buffer("weights", torch.full((k,), 1.0 / k) if weights is None else weights.clone())

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        return gmm_posterior_mean(x, sigma, self.means, self.stds, self.weights)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n data samples (n, D)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator)
        return self.means[k] + self.stds[k, None] * noise


class MLPDenoiser(_ToyDenoiser):
    """A small trainable denoiser: D(x~; s) = c_skip x~ + c_out F(c_in x~, log(s) / 4)
    (EDM preconditioning, Karras et al. 2022, Table 1, with sigma_data)."""

    def __init__(self, schedule: DiscreteVP, dim: int = 2, hidden: int = 128, depth: int = 3,
                 sigma_data: float = 1.0):
        super().__init__(schedule, dim)
        self.sigma_data = sigma_data
        layers, width = [], dim + 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        sd2, s2 = self.sigma_data ** 2, sigma[:, None] ** 2
        # EDM Table 1: c_skip, c_out, c_in, c_noise
        c_skip, c_out = sd2 / (s2 + sd2), sigma[:, None] * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        h = torch.cat([c_in * x, sigma[:, None].log() / 4], dim=1)
        return c_skip * x + c_out * self.net(h)


def ring_mixture(schedule: DiscreteVP, k: int = 6, radius: float = 1.0, std: float = 0.08) -> GaussianMixtureDenoiser:
    """k equal-weight modes evenly spaced on a circle in 2-D (well separated when radius >> std)."""
    ang = torch.arange(k) * 2 * math.pi / k
    means = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
    return GaussianMixtureDenoiser(schedule, means, torch.full((k,), std))
