"""Variance-preserving noise schedules and the conversions between prediction types.

Notation (ALGORITHMS.md, "Notation"): x_t = alpha_t x_0 + sigma_t eps with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t). The EDM/VE view is
x~ = x_t / alpha_t = x_0 + sigma~ eps with sigma~ = sigma_t / alpha_t.

Everything here is pure tensor math on a discrete grid of ``num_train_timesteps``
indices t in {0, ..., T-1}, the convention of DDPM/SD/PixArt and of diffusers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class ScheduleKind(str, Enum):
    linear = "linear"  # DDPM: betas linear in [beta_start, beta_end]
    scaled_linear = "scaled_linear"  # SD: sqrt(betas) linear
    cosine = "cosine"  # Nichol & Dhariwal "squaredcos_cap_v2"


class Prediction(str, Enum):
    eps = "epsilon"
    x0 = "sample"
    v = "v_prediction"
    score = "score"


def make_betas(kind: ScheduleKind | str, num_train_timesteps: int = 1000,
               beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """Betas in float64, shape (T,), computed exactly as diffusers does for each kind."""
    kind = ScheduleKind(kind)
    T = num_train_timesteps
    if kind is ScheduleKind.linear:
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32).double()
    if kind is ScheduleKind.scaled_linear:
        return (torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2).double()

    # Improved DDPM eq. 17: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas capped at 0.999.
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32).double()


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP schedule. ``alphas_cumprod`` has shape (T,), float64."""

    alphas_cumprod: Tensor

    @classmethod
    def from_config(cls, kind: ScheduleKind | str = "linear", num_train_timesteps: int = 1000,
                    beta_start: float = 1e-4, beta_end: float = 2e-2) -> "NoiseSchedule":
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def abar(self, t: Tensor | int, final_alpha_cumprod: float = 1.0) -> Tensor:
        """abar_t for integer timesteps; t < 0 means "clean data" and gives ``final_alpha_cumprod``."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        ac = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, ac, torch.full_like(ac, final_alpha_cumprod))

    def alpha_sigma(self, t: Tensor | int, final_alpha_cumprod: float = 1.0) -> tuple[Tensor, Tensor]:
        ab = self.abar(t, final_alpha_cumprod)
        return ab.sqrt(), (1 - ab).sqrt()

    def snr(self, t: Tensor | int) -> Tensor:
        ab = self.abar(t)
        return ab / (1 - ab)

    def sigma_ve(self, t: Tensor | int) -> Tensor:
        """EDM/VE noise level sigma~ = sigma_t / alpha_t."""
        return (1 / self.snr(t)).sqrt()

    def timestep_for_sigma_ve(self, sigma: float) -> int:
        """Nearest grid index to a VE noise level (SIM's generator sits at sigma~ = 2.5 -> index ~440)."""
        return int(self.timesteps_for_sigma_ve(torch.tensor([float(sigma)]))[0])

    def timesteps_for_sigma_ve(self, sigmas: Tensor) -> Tensor:
        """Nearest grid indices (n,) long to VE noise levels (n,), on the device of ``sigmas``;
        levels past the grid's ends (0, inf included) go to its first or last step."""
        grid = self.sigma_ve(torch.arange(self.num_train_timesteps)).to(sigmas.device)  # increasing in t
        s = sigmas.to(grid.dtype).clamp(grid[0], grid[-1])
        # the two neighbours of each level; a tie goes to the lower step
        hi = torch.searchsorted(grid, s).clamp(1, grid.numel() - 1)
        return torch.where(s - grid[hi - 1] <= grid[hi] - s, hi - 1, hi)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = (bcast(v, x0) for v in self.alpha_sigma(t))
        return a * x0 + s * noise


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) or scalar coefficient to broadcast against ``like`` (B, ...)."""
    v = torch.as_tensor(v, device=like.device)
    v = v.to(like.dtype) if v.is_floating_point() else v
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def convert(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor,
            src: Prediction | str, dst: Prediction | str) -> Tensor:
    """Convert a network output between eps / x0 / v / score at the point x_t.

    alpha, sigma: (B,) or scalars. Identities: x_t = a x0 + s eps; v = a eps - s x0;
    score = -eps / s.
    """
    src, dst = Prediction(src), Prediction(dst)
    if src is dst:
        return pred
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    if src is Prediction.eps:
        eps = pred
    elif src is Prediction.x0:
        eps = (x_t - a * pred) / s
    elif src is Prediction.v:
        eps = a * pred + s * x_t  # since a^2 + s^2 = 1
    else:
        eps = -s * pred
    if dst is Prediction.eps:
        return eps
    x0 = (x_t - s * eps) / a
    if dst is Prediction.x0:
        return x0
    if dst is Prediction.v:
        return a * eps - s * x0
    return -eps / s


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans eq. 6): uncond + w (cond - uncond); w = 1 is no guidance."""
    return uncond + scale * (cond - uncond)
