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
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from hyperscale.config.schema import MethodSection
from hyperscale.diffusion.sampling import NoiseInput, one_step
from hyperscale.diffusion.schedule import Prediction, bcast
from hyperscale.methods.base import Batch, LossOut, Method, RoleSpec
from hyperscale.diffusion.timedist import TimeSampling, time_dist
from hyperscale.methods.scores import TimeRange, fake_score_dsm, generator_noise
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import OneStepCall, SamplerSpec

Distance = Literal["l2", "pseudo_huber", "normalized"]
Divergence = Literal["sg", "full"]


class SimConfig(MethodSection):
    """SIM hyperparameters; defaults and why.

    distance: "pseudo_huber" (the paper's recommended d, §1.4: a bounded, self-normalising
        direction); "l2" is the Fisher divergence (= SiD with alpha = 1); "normalized" is
        the c -> 0 limit y / ||y|| (Dive3D's practice).
    huber_c: pseudo-Huber c per sqrt(dim) in denoiser (pixel) units: the distance acts on
        Delta = sigma~^2 y with c = huber_c * sqrt(C*H*W) at every t (a valid per-t distance,
        so exactness holds), the iCT convention that makes c resolution independent.
        The paper's value was not recovered (§1.4). 0.01 makes the direction normalised once
        D_phi and D_psi differ by more than ~1% RMS per entry and keeps it smooth (finite at
        Delta = 0, where fake = teacher at the start); tune it against ``sim/y_norm``.
    divergence: "sg" (default, the paper: sampling distribution held fixed) or "full".
    variant / sid_alpha: "sid" swaps in SiD's generator loss
        Delta^T[(D_phi - x0) - alpha Delta] as a baseline (alpha = 1.2 is SiD's shipped value).
    init_sigma: 2.5, the generator's fixed VE input level (§1.1; the grid step nearest it).
    teacher_guidance_scale: CFG on the teacher only, fake score unguided (§1.7). 1.0 (none)
        is the CIFAR setting and keeps the target the teacher's own distribution.
    teacher_clip_x0: clamp the (guided) teacher's x0-prediction D_phi to the data range [-1, 1],
        Imagen's static thresholding applied to the target score. The true posterior mean of
        data in [-1, 1] lies in that box, so the clamp moves every pixel of the teacher's estimate
        closer to it; off by default (the exactness gate's Gaussian data are unbounded).
    fake_clip_x0: clamp the fake score's x0-prediction D_psi the same way, in y and in the Stein
        term. With teacher_clip_x0 both estimates are projected onto the box (the consistent
        variant: the teacher alone clamped leaves y = clip(D_phi) - D_psi nonzero at the fixed point).
    generator_clip_x0: clamp the generator's output x0 to the data range [-1, 1] in the forward
        pass, so its samples lie where the data lie (the 1-step analogue of the teacher sampler's
        clip_x0). The gradient is the clamp's own (zero where a pixel is clamped), so the loss is
        still the exact surrogate for the clamped generator. Every image consumer (bench, grids,
        serving) clamps anyway, so the exported weights sample the same images either way. Off by
        default (the exactness gate's Gaussian data are unbounded); the Fashion-MNIST preset turns
        it on: FID 413 against 658 at 1,200 iterations (docs/benchmarks.md §5).
    generator_t_range: fractions of the DDPM grid (of T - 1), t drawn uniformly in between. The grid
        is where the teacher and fake were trained (uniform t), so they are accurate there.
        0.02 drops the nearly clean end (DMD2's 0.02T), where Delta is network error; 0.8
        is SiD's truncation (t_max = 800, sigma~ <= 24.4 on its Karras grid; sigma~ = 25.7 at
        t = 800 on the linear grid), above which x_t says little about x0 (§1.6).
    generator_t_sampling: "grid" draws t uniformly on the DDPM grid; "karras" is SiD's own
        draw (§1.6): the range is a fraction of the Karras rho = 7 noise levels, each draw
        mapped to the grid step with the nearest sigma~, so low noise levels come up far
        more often (diffusion/timedist.py).
    generator_weighting: "uniform" w(t) in denoiser units (the integrand above times
        sigma~^2 for pseudo-Huber/normalized; times sigma~^4 / 2 for L2, so L2 SIM equals SiD
        exactly): every t gets O(1) gradients. "sid" also divides per sample by
        mean|x0 - D_phi| (stop-grad, SiD/DMD2), a heuristic: it depends on x0, not on x_t
        alone, so the surrogate is no longer exact.
    fake_t_range / fake_weighting: DSM for the fake score on detached generator samples with
        the teacher's own loss, eps-MSE uniform over the whole grid (§1.5, as DMD2 does);
        "min_snr" optional.
    fake_t_sampling: how the fake score's t is drawn from fake_t_range, as generator_t_sampling;
        "grid" (default, DMD2), "karras" (where the generator loss queries it) or "lognormal"
        (SiD's and DI's EDM draw, §1.5; fake_t_range then holds quantiles, (0, 1) = all of it).
    critic_steps: fake-score updates per generator update; 1 as SiD and DI (§1.6).
    Labels: data-free; batch.cond supplies the class labels (random labels in training).
    """
    name: Literal["sim"] = "sim"
    distance: Distance = "pseudo_huber"
    huber_c: float = Field(0.01, ge=0)
    divergence: Divergence = "sg"
    variant: Literal["sim", "sid"] = "sim"
    sid_alpha: float = 1.2
    init_sigma: float = Field(2.5, gt=0)
    teacher_guidance_scale: float = Field(1.0, ge=0)
    teacher_clip_x0: bool = False
    fake_clip_x0: bool = False
    generator_clip_x0: bool = False
    generator_t_range: TimeRange = (0.02, 0.8)
    generator_t_sampling: TimeSampling = "grid"
    generator_weighting: Literal["uniform", "sid"] = "uniform"
    fake_t_range: TimeRange = (0.0, 1.0)
    fake_weighting: Literal["uniform", "min_snr"] = "uniform"
    fake_t_sampling: TimeSampling = "grid"
    min_snr_gamma: float = Field(5.0, gt=0)
    critic_steps: int = Field(1, ge=1)


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
        """How the exported weights sample: one call at the grid step nearest sigma~_init, x_t = sigma_t z."""
        t = generator.schedule.timestep_for_sigma_ve(self.config.init_sigma)
        return SamplerSpec(one_step=OneStepCall(int(t), NoiseInput.sigma))

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
            teacher = CFGDenoiser(teacher, self.config.teacher_guidance_scale)
        d_phi = teacher(x_t, t, cond, out=Prediction.x0)
        if self.config.teacher_clip_x0:
            d_phi = d_phi.clamp(-1, 1)
        d_psi = fake_score(x_t, t, cond, out=Prediction.x0)
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
        return fake_score_dsm(fake_score, x0, cond, time_dist(cfg.fake_t_sampling, *cfg.fake_t_range),
                              cfg.fake_weighting, cfg.min_snr_gamma)
