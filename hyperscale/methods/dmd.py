"""One-step DMD: Distribution Matching Distillation (Yin et al., CVPR 2024, arXiv 2311.18828; DMD2,
arXiv 2405.14867), Hyper-SD's one-step enhancement (docs/algorithms.md §2.4).

Generator x0 = G(z): one call of the (teacher-initialised) student at ``generator_timestep``
on x_t = z (``unit``) or sigma_t z. Per sample, at t ~ U[0.02 T, 0.98 T] and
x_t = alpha_t x0 + sigma_t eps:

    g    = (D_fake(x_t) - D_real(x_t)) / mean|x0 - D_real(x_t)|      (no grad, NaN-cleaned)
    L_dm = 1/2 mean((x0 - sg(x0 - g))^2)         so that dL_dm/dx0 = g / (C H W)

D_real is the frozen teacher's x0 prediction with CFG (``real_guidance_scale``), D_fake the
online fake score without CFG. g is, up to the per-sample positive weight, the gradient of
KL(q_t || p_t) with respect to the sample: s_fake - s_real = alpha_t (D_fake - D_real) / sigma_t^2.
The fake score (critic role ``fake_score``) learns by the teacher's eps-MSE on detached
generator samples (the same DSM as SIM's fake score, ``scores.fake_score_dsm``), updated
``critic_steps`` times per generator update (DMD2: 5; DMD: 1).

Regression (DMD's stabiliser, Hyper-SD's "MSE" [P]): MSE between G(z) and the teacher's ODE
solution from the same z, computed online with ``regression_steps`` teacher DDIM steps. Optional
reward hinge (``rewards``, the frozen role ``reward``), as Hyper-SD folds feedback into this
stage [P].
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from hyperscale.diffusion.sampling import NoiseInput, ddim_walk, one_step
from hyperscale.diffusion.schedule import Prediction
from hyperscale.methods.base import Batch, LossOut, Method, RoleSpec
from hyperscale.methods.feedback import RewardSpec, reward_hinge
from hyperscale.diffusion.timedist import TimeSampling, time_dist
from hyperscale.methods.scores import (StudentSection, TimeRange, build_student, check_student, fake_score_dsm,
                                       generator_noise)
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import OneStepCall, SamplerSpec


class DmdConfig(StudentSection):
    """DMD's hyperparameters, one line each (section numbers: docs/algorithms.md; DMD2 values from
    §2.4). The student fields (full or LoRA) come from ``StudentSection``."""
    name: Literal["dmd"] = "dmd"
    generator_timestep: int | None = Field(None, ge=0)  # the 1-step call's t; None: T - 1 (Hyper-SDXL: 800, DMD2: 399)
    noise_input: NoiseInput = NoiseInput.unit  # the call's input: x_t = z ("unit", trailing sampler) or sigma_t z
    real_guidance_scale: float = Field(1.0, ge=0)  # CFG on the real score only (DMD2: 8 SDXL, 1.75 SD1.5)
    t_range: TimeRange = (0.02, 0.98)  # t of the distribution-matching loss: DMD2's U[0.02 T, 0.98 T]
    normalize: bool = True  # divide g by mean|x0 - D_real| per sample (DMD); false: raw D_fake - D_real
    dm_weight: float = Field(1.0, ge=0)  # weight of the distribution-matching loss
    fake_t_range: TimeRange = (0.0, 1.0)  # fake-score eps-MSE t: the whole grid (DMD2)
    fake_weighting: Literal["uniform", "min_snr"] = "uniform"  # fake-score eps-MSE weight: uniform (DMD2) or Min-SNR
    fake_t_sampling: TimeSampling = "grid"  # fake-score t draw, as SIM's: "grid" (DMD2), "karras" or "lognormal"
    min_snr_gamma: float = Field(5.0, gt=0)  # gamma of fake_weighting "min_snr"
    critic_steps: int = Field(5, ge=1)  # fake-score updates per generator update (DMD2: 5; DMD: 1)
    regression: Literal["none", "online"] = "none"  # "online": MSE to the teacher's DDIM solution from the same z
    regression_weight: float = Field(0.25, ge=0)  # DMD's lambda_reg
    regression_steps: int = Field(25, ge=1)  # teacher DDIM steps of that solution (with real_guidance_scale)
    rewards: list[RewardSpec] = Field(default_factory=list)  # optional reward hinge on G(z) (role ``reward``, §2.3)
    feedback_weight: float = Field(1.0, ge=0)  # weight of that hinge


def dmd_direction(x0: Tensor, d_real: Tensor, d_fake: Tensor, normalize: bool = True) -> Tensor:
    """g (B, ...) = (D_fake - D_real) [/ mean|x0 - D_real| per sample], detached; non-finite
    entries -> 0 (DMD2's cleaning; the loss reports how many as ``dmd/nonfinite``)."""
    g = (d_fake - d_real).detach()
    if normalize:
        # DMD eq. 8 weight: 1 / mean over C, H, W of |x0 - D_real| (stop-grad)
        w = (x0.detach() - d_real.detach()).abs().flatten(1).mean(1).clamp_min(1e-12)
        g = g / w.reshape((-1,) + (1,) * (g.ndim - 1))
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x0: Tensor, g: Tensor) -> Tensor:
    """Per-sample 1/2 mean((x0 - sg(x0 - g))^2) (B,): its gradient w.r.t. x0 is g / numel per sample."""
    return 0.5 * (x0 - (x0 - g).detach()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def teacher_ode(teacher, z: Tensor, cond, t_start: int, num_steps: int,
                noise_input: NoiseInput | str = "unit") -> Tensor:
    """The teacher's deterministic DDIM solution (B, ...) from x_{t_start} = z (or sigma z) to clean
    data in ``num_steps`` evenly spaced steps (the last one jumps to abar = 1)."""
    ts = torch.linspace(t_start, 0, num_steps + 1).round().long().tolist()[:-1]
    x = z
    if NoiseInput(noise_input) is NoiseInput.sigma:
        x = z * teacher.schedule.alpha_sigma(t_start)[1].to(z.dtype)
    return ddim_walk(teacher, x, cond, list(zip(ts, ts[1:] + [-1])))


class Dmd(Method):
    """DMD generator loss and fake-score DSM; roles generator, fake_score (trainable), teacher
    [, reward] (frozen)."""
    batch = "conditions"

    def roles(self) -> list[RoleSpec]:
        """The generator as configured (full or LoRA); the fake score as a full teacher copy."""
        cfg = self.config
        out = [RoleSpec("generator", "generator", "custom", build=partial(build_student, cfg=cfg)),
               RoleSpec("fake_score", "critic", "copy_of_teacher"), RoleSpec("teacher", "frozen", "teacher")]
        if cfg.rewards:
            out.append(RoleSpec("reward", "frozen", "reward", rewards=tuple(cfg.rewards)))
        return out

    def critic_steps(self) -> int:
        return self.config.critic_steps

    def _t_gen(self, generator) -> int:
        t = self.config.generator_timestep
        return generator.schedule.num_train_timesteps - 1 if t is None else int(t)

    def generate(self, generator, z: Tensor, cond) -> Tensor:
        """x0 (B, C, H, W) from z: one differentiable call at the generator timestep."""
        return one_step(generator, z, cond, self._t_gen(generator), noise_input=self.config.noise_input)

    def sample(self, generator, z: Tensor, cond: Tensor) -> Tensor:
        return self.generate(generator, z, cond)

    def sampler(self, generator) -> SamplerSpec:
        return SamplerSpec(one_step=OneStepCall(self._t_gen(generator), self.config.noise_input))

    def _real(self, teacher):
        w = self.config.real_guidance_scale
        return CFGDenoiser(teacher, w) if w != 1.0 else teacher

    def generator_loss(self, batch: Batch, *, generator, fake_score, teacher, reward=None, **_) -> LossOut:
        cfg = self.config
        check_student(generator, cfg)
        cond = batch.cond
        z = generator_noise(generator, cond)
        x0 = self.generate(generator, z, cond)
        sched = teacher.schedule
        t = time_dist("grid", *cfg.t_range).draw(sched, x0.shape[0], x0.device)
        with torch.no_grad():
            x_t = sched.add_noise(x0.detach(), torch.randn_like(x0), t)
            d_real = self._real(teacher)(x_t, t, cond, out=Prediction.x0)
            d_fake = fake_score(x_t, t, cond, out=Prediction.x0)
        g = dmd_direction(x0, d_real, d_fake, cfg.normalize)
        dm = dmd_loss(x0, g)
        loss = cfg.dm_weight * dm
        nonfinite = (~torch.isfinite(d_fake - d_real)).sum().to(torch.float32)
        metrics = {"loss/dm": dm.detach().mean(), "dmd/g_norm": g.flatten(1).norm(dim=1).mean(),
                   "dmd/x0_std": x0.detach().std(), "dmd/nonfinite": nonfinite}
        if cfg.regression == "online":
            target = teacher_ode(self._real(teacher), z, cond, self._t_gen(generator), cfg.regression_steps,
                                 cfg.noise_input)
            reg = (x0 - target.detach()).pow(2).flatten(1).mean(1)
            loss = loss + cfg.regression_weight * reg
            metrics["loss/regression"] = reg.detach().mean()
        if cfg.rewards:
            if reward is None:
                raise ValueError("rewards need the frozen role 'reward'")
            fb, m = reward_hinge(x0, cond, reward, cfg.rewards)
            loss = loss + cfg.feedback_weight * fb
            metrics |= m
        return LossOut(loss, metrics)

    def critic_loss(self, batch: Batch, *, generator, fake_score, **_) -> LossOut:
        with torch.no_grad():  # DSM on detached generator samples, as SIM's fake score
            x0 = self.generate(generator, generator_noise(generator, batch.cond), batch.cond)
        cfg = self.config
        return fake_score_dsm(fake_score, x0, batch.cond, time_dist(cfg.fake_t_sampling, *cfg.fake_t_range),
                              cfg.fake_weighting, cfg.min_snr_gamma)
