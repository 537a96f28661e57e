"""Plain denoising training (DDPM, Ho et al. 2020, eq. 14) with optional Min-SNR
weighting (Hang et al. 2023) and label dropout for classifier-free guidance
(Ho & Salimans 2022). Trains the teacher."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from hyperscale.config.schema import MethodSection
from hyperscale.diffusion.sampling import sample_ddim
from hyperscale.diffusion.schedule import Prediction
from hyperscale.diffusion.timedist import TimeSampling, time_dist
from hyperscale.models.cond import cond_len, cond_where
from hyperscale.models.families import family_of
from hyperscale.methods.base import Batch, LossOut, Method, RoleSpec


class DenoisingConfig(MethodSection):
    """The teacher's training loss: eps-MSE with optional Min-SNR weighting and CFG label dropout."""
    name: Literal["denoising"] = "denoising"
    label_dropout: float = Field(0.1, ge=0, le=1)  # p(cond -> null) for CFG
    weighting: Literal["uniform", "min_snr"] = "min_snr"  # eps-MSE weight: uniform (DDPM) or min(SNR, gamma) / SNR
    min_snr_gamma: float = Field(5.0, gt=0)  # Min-SNR's gamma (Hang et al.'s 5)
    time_sampling: TimeSampling = "grid"  # the training-time draw (diffusion/timedist.py); SD3: logit_normal


class Denoising(Method):
    batch = "data"

    def roles(self) -> list[RoleSpec]:
        return [RoleSpec("generator", "generator", "fresh")]

    def generator_loss(self, batch: Batch, *, generator, **_) -> LossOut:
        x0, cond = batch.x0, batch.cond
        sched = generator.schedule
        t = time_dist(self.config.time_sampling).draw(sched, x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        x_t = sched.add_noise(x0, eps, t)
        drop = torch.rand((cond_len(cond),), device=cond.device) < self.config.label_dropout
        cond = cond_where(drop, generator.null_cond(cond), cond)
        eps_hat = generator(x_t, t, cond, out=Prediction.eps)
        per = (eps_hat - eps).pow(2).flatten(1).mean(1)
        if self.config.weighting == "min_snr":
            # eps-loss weight min(SNR, gamma)/SNR (Min-SNR, eq. 8 for eps-prediction)
            snr = sched.snr(t).to(per.dtype)
            per = per * torch.clamp(snr, max=self.config.min_snr_gamma) / snr
        return LossOut(per, {"loss/denoise_mse": (eps_hat - eps).pow(2).mean().detach()})

    def sample(self, generator, z, cond):
        """DDIM, 25 trailing steps, no guidance: a quick look, not the benchmark."""
        return sample_ddim(generator, z, cond, 25, spacing="trailing", clip_x0=family_of(generator).bounded)
