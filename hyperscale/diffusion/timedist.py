"""Distributions of training times: where a method draws t for its losses.

Each ``TimeDist`` draws n times for a schedule with ``draw(schedule, n, device)``:
grid indices (long) or continuous times (float64), both of which every schedule takes
(diffusion/schedule.py). ``time_dist(kind, lo, hi)`` builds one from a method's config.

- ``grid``: uniform on the training grid between the fractions lo, hi of T - 1 (DDPM, DMD2).
- ``karras``: u ~ U[lo, hi] mapped through Karras et al.'s rho = 7 noise levels from 0.002 to 80
  (SiD's grid), then to the schedule time with that VE noise level (docs/algorithms.md §1.6).
- ``lognormal``: EDM's ln sigma~ ~ N(-1.2, 1.2^2) with [lo, hi] read as quantiles (SiD's and
  DI's fake-score draw, docs/algorithms.md §1.5).
- ``logit_normal``: t = sigmoid(N(0, 1)) with [lo, hi] read as quantiles, continuous
  (SD3's rectified-flow training draw, Esser et al. 2403.03206 §3.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

# SiD's noise-level grid: Karras et al.'s rho = 7 spacing from 0.002 to 80
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.002, 80.0, 7.0
# EDM's log-normal noise levels, ln sigma ~ N(P_mean, P_std^2)
LOGNORMAL_P_MEAN, LOGNORMAL_P_STD = -1.2, 1.2
TimeSampling = Literal["grid", "karras", "lognormal", "logit_normal"]


def karras_sigma(u: Tensor) -> Tensor:
    """The Karras rho = 7 noise level at fraction u in [0, 1] (0 -> sigma_min, 1 -> sigma_max)."""
    lo, hi = KARRAS_SIGMA_MIN ** (1 / KARRAS_RHO), KARRAS_SIGMA_MAX ** (1 / KARRAS_RHO)
    return (hi + (1 - u) * (lo - hi)) ** KARRAS_RHO


def lognormal_sigma(u: Tensor) -> Tensor:
    """The EDM log-normal noise level at quantile u in [0, 1] (0 -> 0, 1 -> inf)."""
    return torch.exp(LOGNORMAL_P_MEAN + LOGNORMAL_P_STD * torch.special.ndtri(u))


@dataclass(frozen=True)
class TimeDist:
    """Base: ``lo``, ``hi`` bound the draw (fractions of the grid or quantiles, per kind)."""
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self):
        if not 0 <= self.lo <= self.hi <= 1:
            raise ValueError(f"time range must satisfy 0 <= lo <= hi <= 1, got {(self.lo, self.hi)}")

    def draw(self, schedule, n: int, device) -> Tensor:
        raise NotImplementedError

    def _u(self, n: int) -> Tensor:
        return torch.empty(n, dtype=torch.float64).uniform_(self.lo, self.hi)


class UniformGrid(TimeDist):
    def draw(self, schedule, n: int, device) -> Tensor:
        last = schedule.num_train_timesteps - 1
        return torch.randint(round(self.lo * last), round(self.hi * last) + 1, (n,), device=device)


class Karras(TimeDist):
    def draw(self, schedule, n: int, device) -> Tensor:
        return schedule.timesteps_for_sigma_ve(karras_sigma(self._u(n))).to(device)


class LogNormal(TimeDist):
    def draw(self, schedule, n: int, device) -> Tensor:
        return schedule.timesteps_for_sigma_ve(lognormal_sigma(self._u(n))).to(device)


class LogitNormal(TimeDist):
    def draw(self, schedule, n: int, device) -> Tensor:
        u = self._u(n).clamp(1e-12, 1 - 1e-12)
        return torch.sigmoid(torch.special.ndtri(u)).to(device)


_KINDS: dict[str, type[TimeDist]] = {"grid": UniformGrid, "karras": Karras, "lognormal": LogNormal,
                                     "logit_normal": LogitNormal}


def time_dist(kind: TimeSampling | str, lo: float = 0.0, hi: float = 1.0) -> TimeDist:
    if kind not in _KINDS:
        raise ValueError(f"unknown time sampling '{kind}'; allowed: {', '.join(_KINDS)}")
    return _KINDS[kind](float(lo), float(hi))
