"""SIM: data-free one-step distillation by Score Implicit Matching.

Luo, Huang, Geng, Kolter, Qi, "One-Step Diffusion Distillation through Score Implicit
Matching", NeurIPS 2024 (arXiv 2410.16794); derivation and surrogates as in
docs/algorithms.md §1.3-1.6. A one-step generator x0 = D_theta(sigma~_init z; sigma~_init), a
frozen teacher D_phi and an online fake score D_psi (both copies of the teacher at the start).

All formulas are in VE/denoiser form: x~ = x0 + sigma~ eps and score s = (D - x~) / sigma~^2.
Per sample, with Delta = D_phi(x_t) - D_psi(x_t) (so y = s_p - s_psi = Delta / sigma~^2):

    L_SIM  = d'(y)^T (s_psi - grad log q(x_t|x0))            (divergence "sg", the paper's)
    L_full = L_SIM + d(y)                                      (divergence "full")

Nothing in them is detached: gradients reach theta through x0 and through x_t in the inputs
of the teacher and fake networks; only their parameters are frozen (by the trainer).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import Tensor

from hyperscale.config.schema import MethodSection
from hyperscale.diffusion.sampling import NoiseInput, one_step
from hyperscale.diffusion.schedule import Prediction, bcast
from hyperscale.methods.base import Batch, LossOut, Method, RoleSpec
from hyperscale.diffusion.timedist import TimeSampling, time_dist
from hyperscale.methods.scores import SigmaRange, TimeRange, fake_score_dsm, generator_noise
from hyperscale.models.cond import cond_len, cond_where
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import OneStepCall, SamplerSpec

Distance = Literal["l2", "pseudo_huber", "normalized"]
Divergence = Literal["sg", "full"]


class SimConfig(MethodSection):
    """SIM's hyperparameters, one line each (section numbers: docs/algorithms.md). The Fashion-MNIST
    values and the runs that chose them: jobs/configs/sim.yaml, docs/benchmarks.md §5."""
    name: Literal["sim"] = "sim"
    distance: Distance = "pseudo_huber"  # d: the paper's pseudo-Huber, l2 (= SiD alpha 1) or normalized (c -> 0), §1.4
    huber_c: float = Field(0.01, ge=0)  # pseudo-Huber c per sqrt(C*H*W), on Delta (pixel units); paper's unknown, §1.4
    divergence: Divergence = "sg"  # "sg": L_SIM, the paper's; "full": L_SIM + d(y) (module docstring)
    variant: Literal["sim", "sid"] = "sim"  # "sid": SiD's generator loss in place of SIM's, a baseline (§1.3)
    sid_alpha: float = 1.2  # SiD's alpha for variant "sid" (SiD's shipped value)
    init_sigma: float = Field(2.5, gt=0)  # the generator's fixed VE input level sigma~_init (§1.1); flow exports: .inf
    teacher_guidance_scale: float = Field(1.0, ge=0)  # CFG on the teacher; 1.0 = none (§1.7)
    teacher_guidance_sigma: Optional[SigmaRange] = None  # CFG only at VE sigma~ in (lo, hi]; None: at every level (§1.7)
    # the fake score's own CFG in the generator loss, D_psi(null) + s (D_psi(c) - D_psi(null)); 1.0 = none,
    # 0: an unconditional fake score (SiD's Zero-CFG with teacher scale 1), < 0: Anti-CFG (§1.7)
    fake_guidance_scale: float = 1.0
    fake_guidance_sigma: Optional[SigmaRange] = None  # the fake score's CFG only at VE sigma~ in (lo, hi] (§1.7)
    fake_cond_dropout: float = Field(0.0, ge=0, le=1)  # p(condition -> null) in the fake score's DSM (§1.7)
    teacher_clip_x0: bool = False  # clamp the teacher's x0-prediction D_phi to [-1, 1] (§1.12)
    fake_clip_x0: bool = False  # clamp the fake score's D_psi too, in y and the Stein term (§1.12)
    generator_clip_x0: bool = False  # clamp the generator's x0 to [-1, 1] in the forward pass (§1.12)
    generator_t_range: TimeRange = (0.02, 0.8)  # generator-loss t: DMD2's 0.02 T to SiD's 0.8 truncation (§1.6)
    generator_t_sampling: TimeSampling = "grid"  # t uniform on the DDPM grid, or "karras": SiD's rho = 7 draw (§1.6)
    generator_weighting: Literal["uniform", "sid"] = "uniform"  # "sid": / mean|x0 - D_phi|, no longer exact (§1.6)
    fake_t_range: TimeRange = (0.0, 1.0)  # fake-score DSM t: fractions of the grid, quantiles for lognormal (§1.5)
    fake_weighting: Literal["uniform", "min_snr"] = "uniform"  # fake-score eps-MSE weight: DMD2's uniform or Min-SNR
    fake_t_sampling: TimeSampling = "grid"  # fake-score t draw: "grid" (DMD2), "karras" or "lognormal" (SiD, DI; §1.5)
    min_snr_gamma: float = Field(5.0, gt=0)  # gamma of fake_weighting "min_snr"
    critic_steps: int = Field(1, ge=1)  # fake-score updates per generator update; 1 as SiD and DI (§1.6)

    @model_validator(mode="after")
    def _fake_branches_trained(self):
        s, p = self.fake_guidance_scale, self.fake_cond_dropout
        if s != 1.0 and p == 0.0:
            raise ValueError(f"fake_guidance_scale {s} reads the fake score's unconditional branch, which it "
                             "never trains with fake_cond_dropout 0: set fake_cond_dropout > 0 (1.0 with "
                             "fake_guidance_scale 0 for an unconditional fake score)")
        if p == 1.0 and s != 0.0:
            raise ValueError("fake_cond_dropout 1.0 trains only the fake score's unconditional branch: use it "
                             f"with fake_guidance_scale 0, not {s}")
        if p == 1.0 and self.fake_guidance_sigma is not None:
            raise ValueError("fake_cond_dropout 1.0 never trains the conditional branch that fake_guidance_sigma "
                             "uses outside its interval: lower fake_cond_dropout or drop fake_guidance_sigma")
        return self


def distance_terms(y: Tensor, distance: Distance, c: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """d(y) (B,) and d'(y) (B, ...) for y (B, ...); c: scalar or (B,), ignored for l2."""
    sq = y.flatten(1).pow(2).sum(1)
    if distance == "l2":
        # §1.4: d = ||y||^2, d' = 2y
        return sq, 2 * y
    c = torch.zeros_like(sq) if distance == "normalized" else torch.as_tensor(c, dtype=y.dtype, device=y.device)
    # §1.4: d = sqrt(||y||^2 + c^2) - c, d' = y / sqrt(||y||^2 + c^2); clamped before the sqrt,
    # so y = 0 (fake = teacher at the start) gives d' = 0 and finite gradients
    r = (sq + c * c).clamp_min(1e-30).sqrt()
    return r - c, y / bcast(r, y)


def sim_integrand(d_phi: Tensor, d_psi: Tensor, x0: Tensor, sigma: Tensor | float | None = None, *,
                  distance: Distance = "pseudo_huber", c: Tensor | float = 0.0,
                  divergence: Divergence = "sg") -> tuple[Tensor, Tensor]:
    """Per-sample SIM surrogate at one noise level; returns (loss (B,), d(y) (B,)).

    d_phi, d_psi: teacher and fake x0-predictions at x_t, (B, ...); x0: generator output (B, ...).
    sigma: VE noise level sigma~, scalar or (B,): y and the Stein term are in score units.
    None works in denoiser units, i.e. uses the per-t distance d_t(y) = d(sigma~^2 y).
    """
    s2 = 1.0 if sigma is None else bcast(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device) ** 2, x0)
    # §1.3 denoiser form: y = s_p - s_psi = (D_phi - D_psi) / sigma~^2
    y = (d_phi - d_psi) / s2
    # §1.3: s_psi(x_t) - grad log q(x_t | x0) = (D_psi - x_t)/sigma~^2 + (x_t - x0)/sigma~^2
    stein = (d_psi - x0) / s2
    d, d_prime = distance_terms(y, distance, c)
    # §1.3: L_SIM = d'(y)^T (s_psi - grad log q(x_t|x0)); D_full adds d(y)
    loss = (d_prime * stein).flatten(1).sum(1)
    return (loss + d if divergence == "full" else loss), d


def sid_integrand(d_phi: Tensor, d_psi: Tensor, x0: Tensor, alpha: float) -> Tensor:
    """SiD's generator loss per sample (B,), inputs (B, ...)."""
    delta = d_phi - d_psi
    # §1.3 (SiD): (D_phi - D_psi)^T [(D_phi - x0) - alpha (D_phi - D_psi)]
    return (delta * ((d_phi - x0) - alpha * delta)).flatten(1).sum(1)


class Sim(Method):
    """SIM generator loss (§1.3) and fake-score DSM (§1.5); roles by name."""
    batch = "conditions"

    def roles(self) -> list[RoleSpec]:
        return [RoleSpec("generator", "generator", "copy_of_teacher"),
                RoleSpec("fake_score", "critic", "copy_of_teacher"), RoleSpec("teacher", "frozen", "teacher")]

    def critic_steps(self) -> int:
        return self.config.critic_steps

    def generate(self, generator, z: Tensor, cond) -> Tensor:
        """x0 (B, C, H, W) from noise z (B, C, H, W): one differentiable call at sigma~_init (§1.1)."""
        t = generator.schedule.timestep_for_sigma_ve(self.config.init_sigma)
        x0 = one_step(generator, z, cond, t, noise_input="sigma")
        return x0.clamp(-1, 1) if self.config.generator_clip_x0 else x0

    def sample(self, generator, z: Tensor, cond: Tensor) -> Tensor:
        return self.generate(generator, z, cond)

    def sampler(self, generator) -> SamplerSpec:
        """How the exported weights sample: one call at the grid step nearest sigma~_init (a
        continuous time on rectified flow: 1.0 for init_sigma .inf, x_t = z), x_t = sigma_t z."""
        t = generator.schedule.timestep_for_sigma_ve(self.config.init_sigma)
        return SamplerSpec(one_step=OneStepCall(t, NoiseInput.sigma))

    def _samples(self, generator, cond: Tensor) -> Tensor:
        return self.generate(generator, generator_noise(generator, cond), cond)

    def per_sample(self, d_phi: Tensor, d_psi: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """The configured integrand in denoiser units, (loss (B,), distance (B,)); inputs (B, ...)."""
        cfg = self.config
        if cfg.variant == "sid":
            loss = sid_integrand(d_phi, d_psi, x0, cfg.sid_alpha)
            dist = (d_phi - d_psi).flatten(1).pow(2).sum(1)
        else:
            c = cfg.huber_c * math.sqrt(x0[0].numel())
            loss, dist = sim_integrand(d_phi, d_psi, x0, None, distance=cfg.distance, c=c,
                                       divergence=cfg.divergence)
            if cfg.distance == "l2":  # w = sigma~^4 / 2: L2 SIM = SiD(alpha=1), L2 full = SiD(alpha=0.5)
                loss, dist = loss / 2, dist / 2
        if cfg.generator_weighting == "sid":
            # SiD/DMD2 normaliser: per-sample mean|x0 - D_phi|, stop-grad, clipped at 1e-5
            loss = loss / (x0 - d_phi).detach().abs().flatten(1).mean(1).clamp_min(1e-5)
        return loss, dist

    def generator_loss(self, batch: Batch, *, generator, fake_score, teacher, **_) -> LossOut:
        cond = batch.cond
        x0 = self._samples(generator, cond)
        sched = teacher.schedule
        t = time_dist(self.config.generator_t_sampling, *self.config.generator_t_range).draw(
            sched, x0.shape[0], x0.device)
        x_t = sched.add_noise(x0, torch.randn_like(x0), t)
        if self.config.teacher_guidance_scale != 1.0:
            teacher = CFGDenoiser(teacher, self.config.teacher_guidance_scale, self.config.teacher_guidance_sigma)
        d_phi = teacher(x_t, t, cond, out=Prediction.x0)
        if self.config.teacher_clip_x0:
            d_phi = d_phi.clamp(-1, 1)
        s = self.config.fake_guidance_scale
        interval = self.config.fake_guidance_sigma
        if s == 0.0 and interval is None:  # the unconditional branch alone: one call
            d_psi = fake_score(x_t, t, fake_score.null_cond(cond), out=Prediction.x0)
        else:
            d_psi = CFGDenoiser(fake_score, s, interval)(x_t, t, cond, out=Prediction.x0)  # s = 1: fake_score itself
        if self.config.fake_clip_x0:
            d_psi = d_psi.clamp(-1, 1)
        loss, dist = self.per_sample(d_phi, d_psi, x0)
        y_norm = (d_phi - d_psi).detach().flatten(1).norm(dim=1)
        return LossOut(loss, {"sim/y_norm": y_norm.mean(), "sim/dist": dist.detach().mean(),
                              "sim/sigma": sched.sigma_ve(t).mean().to(x0.dtype),
                              "sim/x0_std": x0.detach().std()})

    def critic_loss(self, batch: Batch, *, generator, fake_score, **_) -> LossOut:
        cond = batch.cond
        with torch.no_grad():  # §1.5: DSM on detached generator samples
            x0 = self._samples(generator, cond)
        cfg = self.config
        if cfg.fake_cond_dropout > 0:  # §1.7: the unconditional branch the fake score's guidance reads
            drop = torch.rand((cond_len(cond),), device=x0.device) < cfg.fake_cond_dropout
            cond = cond_where(drop, fake_score.null_cond(cond), cond)
        return fake_score_dsm(fake_score, x0, cond, time_dist(cfg.fake_t_sampling, *cfg.fake_t_range),
                              cfg.fake_weighting, cfg.min_snr_gamma)
