"""Noise schedules in continuous time, and the conversions between prediction types.

Every schedule is an affine path x_t = alpha(t) x_0 + sigma(t) eps for t in [0, 1]
(t = 0 clean data, t = 1 pure noise); the VE view is x~ = x_t / alpha = x_0 + sigma~ eps
with sigma~ = sigma / alpha (docs/algorithms.md §0.2).

- ``DiscreteVP``: the DDPM/SD/PixArt schedule, defined on a grid of T training indices
  i in {0, ..., T-1} (alpha = sqrt(abar_i), sigma = sqrt(1 - abar_i)); a UNet trained on
  it sees the index i as its timestep. Grid index i sits at time t = (i + 1) / T, so
  index -1 (t = 0) is clean data, and a continuous t snaps to the nearest index.
- ``RectifiedFlow``: SD3/FLUX, sigma(t) = shift t / (1 + (shift - 1) t), alpha = 1 - sigma;
  the network sees 1000 sigma as its timestep, as diffusers' FlowMatchEulerDiscreteScheduler.

Time arguments. A float (python or tensor) is continuous time t in [0, 1]; an integer is an
index on the schedule's training grid (t = (i + 1) / T), the key TSCD's segments, the
DDIM/LCM/TCD grids and diffusers' schedulers use. Both kinds go into every method below.
"""
from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor


class ScheduleKind(str, Enum):
    linear = "linear"  # DDPM: betas linear in [beta_start, beta_end]
    scaled_linear = "scaled_linear"  # SD: sqrt(betas) linear
    cosine = "cosine"  # Nichol & Dhariwal "squaredcos_cap_v2"
    rectified_flow = "rectified_flow"  # SD3 / FLUX: alpha = 1 - sigma, sigma = shifted t


class Prediction(str, Enum):
    eps = "epsilon"
    x0 = "sample"
    v = "v_prediction"
    flow = "flow_prediction"  # eps - x0, the rectified-flow velocity d x_t / d sigma (SD3, FLUX)
    score = "score"


def make_betas(kind: ScheduleKind | str, num_train_timesteps: int = 1000,
               beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """Betas in float64, shape (T,), computed exactly as diffusers does for each VP kind."""
    kind = ScheduleKind(kind)
    T = num_train_timesteps
    if kind is ScheduleKind.linear:
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32).double()
    if kind is ScheduleKind.scaled_linear:
        return (torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2).double()
    if kind is ScheduleKind.rectified_flow:
        raise ValueError("rectified_flow has no betas: use RectifiedFlow")

    # Improved DDPM eq. 17: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas capped at 0.999.
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32).double()


def is_index(t) -> bool:
    """Whether a time argument is a grid index (int or integer tensor) rather than continuous time."""
    if isinstance(t, Tensor):
        return not (t.is_floating_point() or t.is_complex())
    return isinstance(t, int) and not isinstance(t, bool)


def as_time(t) -> Tensor:
    """A time argument as a tensor: python floats in float64, indices and tensors as they are."""
    return torch.tensor(t, dtype=torch.float64) if isinstance(t, float) else torch.as_tensor(t)


class Schedule:
    """An affine noising path; subclasses implement ``alpha_sigma`` and ``model_time``."""

    num_train_timesteps: int

    def alpha_sigma(self, t, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) in float64 (or ``dtype``), on the device of ``t``."""
        raise NotImplementedError

    def model_time(self, t: Tensor) -> Tensor:
        """What the network is fed as its timestep at t (shape of t)."""
        raise NotImplementedError

    def time(self, t) -> Tensor:
        """Continuous time in [0, 1], float64: grid indices i map to (i + 1) / T."""
        t = as_time(t)
        return (t + 1).double() / self.num_train_timesteps if is_index(t) else t.double()

    def index(self, t) -> Tensor:
        """The nearest training-grid index (long) of each time (-1: clean data)."""
        t = as_time(t)
        if is_index(t):
            return t.long()
        T = self.num_train_timesteps
        return ((t.double() * T).round() - 1).long().clamp(-1, T - 1)

    def alpha(self, t) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t) -> Tensor:
        return self.alpha_sigma(t)[1]

    def snr(self, t) -> Tensor:
        a, s = self.alpha_sigma(t)
        return (a / s) ** 2

    def sigma_ve(self, t) -> Tensor:
        """EDM/VE noise level sigma~ = sigma / alpha."""
        a, s = self.alpha_sigma(t)
        return s / a

    def add_noise(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        a, s = (bcast(v, x0) for v in self.alpha_sigma(t))
        return a * x0 + s * noise

    def timesteps_for_sigma_ve(self, sigmas: Tensor) -> Tensor:
        """The times (n,) whose VE noise level sigma / alpha is ``sigmas`` (n,)."""
        raise NotImplementedError

    def timestep_for_sigma_ve(self, sigma: float) -> int | float:
        """The time of one VE noise level: a grid index (python int) on a discrete schedule, a
        continuous time (float) otherwise (SIM's generator sits at sigma~ = 2.5: index ~440 on the
        linear VP grid)."""
        t = self.timesteps_for_sigma_ve(torch.tensor([float(sigma)], dtype=torch.float64))[0]
        return int(t) if is_index(t) else float(t)


class DiscreteVP(Schedule):
    """A discrete VP schedule. ``alphas_cumprod`` has shape (T,), float64."""

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = alphas_cumprod.double()
        self._tables: dict[torch.device, Tensor] = {}

    @classmethod
    def from_config(cls, kind: ScheduleKind | str = "linear", num_train_timesteps: int = 1000,
                    beta_start: float = 1e-4, beta_end: float = 2e-2) -> "DiscreteVP":
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return self._tables[device]

    def abar(self, t, final_alpha_cumprod: float = 1.0) -> Tensor:
        """abar at each time (float64, device of t); index -1 (t = 0) is clean data and gives
        ``final_alpha_cumprod``."""
        i = self.index(t)
        ac = self._table(i.device)[i.clamp(min=0)]
        return torch.where(i >= 0, ac, torch.full_like(ac, final_alpha_cumprod))

    def alpha_sigma(self, t, dtype: torch.dtype | None = None,
                    final_alpha_cumprod: float = 1.0) -> tuple[Tensor, Tensor]:
        ab = self.abar(t, final_alpha_cumprod)
        if dtype is not None:  # the roots taken in the caller's dtype, as the network's own conversion
            ab = ab.to(dtype)
        return ab.sqrt(), (1 - ab).sqrt()

    def model_time(self, t: Tensor) -> Tensor:
        return self.index(t)

    def snr(self, t) -> Tensor:
        ab = self.abar(t)
        return ab / (1 - ab)

    def sigma_ve(self, t) -> Tensor:
        return (1 / self.snr(t)).sqrt()

    def timesteps_for_sigma_ve(self, sigmas: Tensor) -> Tensor:
        """Nearest grid indices (n,) long to VE noise levels (n,), on the device of ``sigmas``;
        levels past the grid's ends (0, inf included) go to its first or last step."""
        grid = self.sigma_ve(torch.arange(self.num_train_timesteps)).to(sigmas.device)  # increasing in t
        s = sigmas.to(grid.dtype).clamp(grid[0], grid[-1])
        # the two neighbours of each level; a tie goes to the lower step
        hi = torch.searchsorted(grid, s).clamp(1, grid.numel() - 1)
        return torch.where(s - grid[hi - 1] <= grid[hi] - s, hi - 1, hi)


class RectifiedFlow(Schedule):
    """x_t = (1 - sigma) x_0 + sigma eps with sigma = shift t / (1 + (shift - 1) t) (SD3's
    time shift; shift 1 is the plain linear path). The network's timestep is 1000 sigma.

    ``spacing``: the times of the family's n-step Euler sampler (``sampling.flow_times``), as its
    pipeline calls FlowMatchEulerDiscreteScheduler: "linspace" (SD3: the scheduler's own grid,
    unshifted times from 1 to its smallest training sigma) or "trailing" (FLUX: the pipeline
    passes sigmas 1, (n-1)/n, ..., 1/n)."""

    SPACINGS = ("linspace", "trailing")

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, spacing: str = "linspace"):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if spacing not in self.SPACINGS:
            raise ValueError(f"rectified-flow spacing must be one of {self.SPACINGS}, got {spacing!r}")
        self.shift, self._T, self.spacing = float(shift), int(num_train_timesteps), spacing

    @property
    def num_train_timesteps(self) -> int:
        return self._T

    def shifted(self, u: Tensor) -> Tensor:
        """sigma for unshifted time u (float64)."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def unshifted(self, sigma: Tensor) -> Tensor:
        """The time t with sigma(t) = sigma (inverse of ``shifted``)."""
        return sigma / (self.shift - (self.shift - 1) * sigma)

    def alpha_sigma(self, t, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        s = self.shifted(self.time(t))
        a = 1 - s
        return (a, s) if dtype is None else (a.to(dtype), s.to(dtype))

    def model_time(self, t: Tensor) -> Tensor:
        return (self.shifted(self.time(t)) * self.num_train_timesteps).float()

    def timesteps_for_sigma_ve(self, sigmas: Tensor) -> Tensor:
        """Continuous times (n,) float64 whose VE noise level sigma / (1 - sigma) is ``sigmas``."""
        s = sigmas.double()
        return self.unshifted(torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s)))


def schedule_from_config(kind: ScheduleKind | str = "linear", num_train_timesteps: int = 1000,
                         beta_start: float = 1e-4, beta_end: float = 2e-2, shift: float = 1.0) -> Schedule:
    if ScheduleKind(kind) is ScheduleKind.rectified_flow:
        return RectifiedFlow(shift, num_train_timesteps)
    return DiscreteVP.from_config(kind, num_train_timesteps, beta_start, beta_end)


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) or scalar coefficient to broadcast against ``like`` (B, ...)."""
    v = torch.as_tensor(v, device=like.device)
    v = v.to(like.dtype) if v.is_floating_point() else v
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def to_eps_x0(pred: Tensor, x_t: Tensor, a: Tensor, s: Tensor, src: Prediction) -> tuple[Tensor, Tensor | None]:
    """(eps, x0 or None) from a prediction of type ``src`` at x_t = a x0 + s eps (a, s broadcast)."""
    if src is Prediction.eps:
        return pred, None
    if src is Prediction.x0:
        return (x_t - a * pred) / s, pred
    if src is Prediction.v:  # v = a eps - s x0
        n = a * a + s * s
        return (a * pred + s * x_t) / n, (a * x_t - s * pred) / n
    if src is Prediction.flow:  # f = eps - x0
        n = a + s
        return (x_t + a * pred) / n, (x_t - s * pred) / n
    return -s * pred, None  # score = -eps / s


def convert(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor,
            src: Prediction | str, dst: Prediction | str) -> Tensor:
    """Convert a network output between eps / x0 / v / flow / score at the point x_t, for any
    affine path x_t = alpha x0 + sigma eps. alpha, sigma: (B,) or scalars.
    Identities: v = alpha eps - sigma x0; flow = eps - x0; score = -eps / sigma."""
    src, dst = Prediction(src), Prediction(dst)
    if src is dst:
        return pred
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    eps, x0 = to_eps_x0(pred, x_t, a, s, src)
    if dst is Prediction.eps:
        return eps
    if x0 is None:
        x0 = (x_t - s * eps) / a
    if dst is Prediction.x0:
        return x0
    if dst is Prediction.v:
        return a * eps - s * x0
    if dst is Prediction.flow:
        return eps - x0
    return -eps / s


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance (Ho & Salimans eq. 6): uncond + w (cond - uncond); w = 1 is no guidance."""
    return uncond + scale * (cond - uncond)
