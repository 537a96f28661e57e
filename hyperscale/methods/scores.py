"""Pieces shared by the score-distillation methods (SIM, DMD): time sampling, the online fake
score's denoising score matching, 1-step generator sampling, and student construction."""
from __future__ import annotations

import copy
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from hyperscale.config import MethodSection
from hyperscale.diffusion.schedule import NoiseSchedule, Prediction
from hyperscale.methods.base import LossOut
from hyperscale.models.generator import sample_shape


# SiD's noise-level grid (ALGORITHMS.md §1.6): Karras et al.'s rho = 7 spacing from 0.002 to 80
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.002, 80.0, 7.0
# SiD's / DI's fake-score noise levels (ALGORITHMS.md §1.5): EDM's log-normal, ln sigma ~ N(-1.2, 1.2^2)
LOGNORMAL_P_MEAN, LOGNORMAL_P_STD = -1.2, 1.2
TimeSampling = Literal["grid", "karras", "lognormal"]


def karras_sigma(u: Tensor) -> Tensor:
    """The Karras rho = 7 noise level at fraction u in [0, 1] (0 -> sigma_min, 1 -> sigma_max)."""
    lo, hi = KARRAS_SIGMA_MIN ** (1 / KARRAS_RHO), KARRAS_SIGMA_MAX ** (1 / KARRAS_RHO)
    return (hi + (1 - u) * (lo - hi)) ** KARRAS_RHO


def lognormal_sigma(u: Tensor) -> Tensor:
    """The EDM log-normal noise level at quantile u in [0, 1] (0 -> 0, 1 -> inf)."""
    return torch.exp(LOGNORMAL_P_MEAN + LOGNORMAL_P_STD * torch.special.ndtri(u))


def draw_timesteps(schedule: NoiseSchedule, n: int, t_range: tuple[float, float], device,
                   sampling: TimeSampling = "grid") -> Tensor:
    """n integer timesteps (n,) from the two fractions in ``t_range``. "grid": uniform on the DDPM
    grid between the fractions of T - 1. "karras" (SiD): u uniform between the fractions, mapped
    through the Karras rho = 7 noise levels (u = 0.8 -> sigma~ 24.4), then to the grid index with
    the nearest VE noise level; this puts far more draws at low noise than "grid" (median
    sigma~ about 1 against about 2 for [0, 0.8] on the linear schedule). "lognormal" (SiD's and
    DI's fake-score draw, EDM's P_mean = -1.2, P_std = 1.2): u uniform between the fractions read
    as quantiles of the log-normal, so (0, 1) is the whole distribution (median sigma~ 0.30),
    mapped to the grid the same way (levels beyond the grid's ends go to its first or last step)."""
    if sampling in ("karras", "lognormal"):
        u = torch.empty(n, dtype=torch.float64).uniform_(*t_range)
        sigma = karras_sigma(u) if sampling == "karras" else lognormal_sigma(u)
        return schedule.timesteps_for_sigma_ve(sigma).to(device)
    last = schedule.num_train_timesteps - 1
    lo, hi = round(t_range[0] * last), round(t_range[1] * last)
    return torch.randint(lo, hi + 1, (n,), device=device)


def fake_score_dsm(fake_score, x0: Tensor, cond, t_range: tuple[float, float],
                   weighting: Literal["uniform", "min_snr"] = "uniform", min_snr_gamma: float = 5.0,
                   sampling: TimeSampling = "grid") -> LossOut:
    """Denoising score matching of the online fake score on (detached) generator samples x0
    (B, ...) with the teacher's own loss: eps-MSE on the DDPM grid, t from ``t_range`` drawn as
    ``sampling`` says (default uniform on the grid: ALGORITHMS.md §1.5 / §2.4, as DMD2 does),
    optional Min-SNR weighting. Per-sample (B,)."""
    sched = fake_score.schedule
    t = draw_timesteps(sched, x0.shape[0], t_range, x0.device, sampling)
    eps = torch.randn_like(x0)
    eps_hat = fake_score(sched.add_noise(x0, eps, t), t, cond, out=Prediction.eps)
    mse = (eps_hat - eps).pow(2).flatten(1).mean(1)
    per = mse
    if weighting == "min_snr":
        # eps-loss weight min(SNR, gamma) / SNR (Min-SNR, eq. 8)
        snr = sched.snr(t).to(mse.dtype)
        per = mse * torch.clamp(snr, max=min_snr_gamma) / snr
    return LossOut(per, {"loss/fake_dsm": mse.detach().mean()})


def generator_noise(generator, cond: Tensor) -> Tensor:
    """Standard normal z (B, C, H, W) for a generator's data shape, in its parameter dtype."""
    p = next(iter(generator.parameters()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    return torch.randn((cond.shape[0],) + sample_shape(generator), device=cond.device, dtype=dtype)


class StudentSection(MethodSection):
    """How the student (the generator role) is built from the teacher.

    student: "full" fine-tunes a copy of the teacher; "lora" trains a peft LoRA on the copy's
        UNet (Hyper-SD trains LoRAs, §2.2 [P, from its released artifacts]).
    lora_rank / lora_alpha / lora_dropout / lora_target_modules: the diffusers-script flags.
        alpha None means alpha = rank (scale 1); target modules None means LCM-LoRA's list
        (attention, feed-forward, resnet convs, time projections, resamplers) filtered to the
        modules the UNet has. Rank 64 is PCM's / Hyper-SD's SD value [R].
    init_student: start from an earlier phase's export (a directory ``save_student`` wrote, e.g.
        ``runs/<run>/export/ema``; local, hub id or s3://) instead of the plain teacher copy.
        With student "lora" the export must be a LoRA export of this teacher with the same
        rank / alpha / targets: training continues that same LoRA (Hyper-SD's stages resume from
        the previous stage's weights, §2.2 [P]). With "full" its weights (merged ones for a
        LoRA export) are loaded. None: the teacher copy.
    """
    name: str
    student: Literal["full", "lora"] = "full"
    lora_rank: int = Field(64, ge=1)
    lora_alpha: Optional[float] = Field(None, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: Optional[list[str]] = None
    init_student: Optional[str] = None


def build_student(teacher: nn.Module, cfg: StudentSection) -> nn.Module:
    """A trainable copy of the teacher, LoRA-wrapped when ``cfg.student == "lora"``, started from
    ``cfg.init_student`` when given (the file reading lives in ``hyperscale.models.lora``)."""
    student = copy.deepcopy(teacher)
    if cfg.init_student:
        from hyperscale.io import absolute_local
        from hyperscale.models.lora import init_student

        try:
            student = init_student(student, absolute_local(cfg.init_student), cfg.student == "lora",
                                   cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
        except (OSError, ValueError) as e:
            raise type(e)(f"method.init_student={cfg.init_student!r}: {e}") from e
    elif cfg.student == "lora":
        from hyperscale.models.lora import apply_lora

        student = apply_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
    return student.train()


def check_student(generator: nn.Module, cfg: StudentSection) -> None:
    """Fail loudly when a trainer built a full copy although the config asks for a LoRA."""
    if cfg.student == "lora":
        from hyperscale.models.lora import LoraDenoiser

        m = generator  # look through engine / data-parallel wrappers (``.module``)
        while not isinstance(m, LoraDenoiser) and isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        if not isinstance(m, LoraDenoiser):
            raise TypeError("method.student = 'lora' but the generator role carries no LoRA: build the roles "
                            "with method.build_role(name, teacher)")

