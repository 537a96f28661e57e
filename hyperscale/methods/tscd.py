"""TSCD: Trajectory Segmented Consistency Distillation (Hyper-SD, Ren et al. 2024, arXiv 2404.13686;
docs/algorithms.md §2.2), and plain consistency distillation (``cd``) as its one-segment case.

Per sample, on a data batch x0 (segment math in ``hyperscale.diffusion.segments``):

    t_n on the skipping-step grid (minus segment lower edges), e = lower edge of t_n's segment,
    t_{n-1} = max(t_n - s, e), t_end = e ("edge") or U{e..t_{n-1}} ("random")
    x_{t_n} = alpha x0 + sigma eps
    x^_{t_{n-1}} = DDIM(x_{t_n}, eps_teacher^w(x_{t_n}, t_n), t_n -> t_{n-1})      (no grad; CFG w)
    pred   = DDIM(x_{t_n},   eps_student(x_{t_n}, t_n),           t_n     -> t_end)
    target = DDIM(x^_{t_{n-1}}, eps_target(x^_{t_{n-1}}, t_{n-1}), t_{n-1} -> t_end)  (no grad;
             = x^_{t_{n-1}} itself when t_{n-1} = t_end: the boundary condition)
    loss   = w_cons d(pred, target) [+ w_adv hinge_G(D(renoise(pred)))]

d is L2 (mean over entries) or LCM's pseudo-Huber mean(sqrt(diff^2 + c^2) - c). The target
network is an EMA of the student (role ``target``, built and updated by the trainer, LCM's
``ema_decay`` 0.95) or the online student under stop-gradient (PCM). Stages (default 8 -> 4
-> 2 -> 1 segments) are config data; the trainer calls ``set_global_step`` so the method
knows its stage. With one segment and ``edge`` targets this is LCM-style consistency
distillation with the boundary at the clean end (``trailing``) or timestep 0 (``floor``).

Roles (``Tscd.roles``): ``generator`` (trainable, a copy of the teacher, full or LoRA),
``teacher`` (frozen), ``target`` (frozen EMA of the generator; only with
target_network = "ema"), ``discriminator`` (trainable critic, only with adversarial = true:
a head on frozen teacher features, ``hyperscale.methods.adversarial``).
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from hyperscale.config.schema import Section
from hyperscale.diffusion import segments as seg
from hyperscale.diffusion.sampling import NoiseInput, predict_pair, sample_ddim, sample_euler
from hyperscale.diffusion.schedule import RectifiedFlow
from hyperscale.methods.adversarial import build_discriminator, discriminate, hinge_d, hinge_g
from hyperscale.methods.base import Batch, LossOut, Method, RoleSpec
from hyperscale.methods.scores import StudentSection, build_student, check_student
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import FewStep, OneStepCall, SamplerSpec


class StageSection(Section):
    """One TSCD stage. Hyper-SD lowers the MSE weight and raises the adversarial one as k shrinks
    (docs/algorithms.md §2.2 [P]; values not recovered), so the weights are per-stage data."""
    segments: int = Field(ge=1)  # the segment count k
    steps: int = Field(1000, ge=1)  # generator updates in this stage
    consistency_weight: float = Field(1.0, ge=0)  # weight of the consistency distance
    adv_weight: float = Field(0.0, ge=0)  # weight of the adversarial generator term (with adversarial: true)


def _default_stages() -> list[StageSection]:
    return [StageSection(segments=k) for k in (8, 4, 2, 1)]


class TscdConfig(StudentSection):
    """TSCD's hyperparameters, one line each (section numbers: docs/algorithms.md). The student fields
    (full or LoRA) come from ``StudentSection``."""
    name: Literal["tscd"] = "tscd"
    # 8 -> 4 -> 2 -> 1 segments [V], each stage resuming from the previous one [P]; steps are a budget (§2.2)
    stages: list[StageSection] = Field(default_factory=_default_stages, min_length=1)
    edges: seg.EdgeRule = seg.EdgeRule.trailing  # tops at k-step trailing DDIM, bottom clean; "floor": bottom t = 0
    target: seg.TargetRule = seg.TargetRule.edge  # "edge": to the lower edge (PCM); "random": CTM-style (§2.2 [P])
    timesteps: seg.TimestepRule = seg.TimestepRule.grid  # t_n on the skipping-step grid (LCM) or on every integer
    num_ddim_timesteps: int = Field(50, ge=1)  # teacher grid N, skip T // N (LCM: 50; PCM: 40, dividing T/k)
    teacher_guidance_scale: float = Field(1.0, ge=0)  # CFG on the teacher's ODE step (baked in); 1.0 = none
    target_network: Literal["ema", "online"] = "ema"  # LCM's EMA student (role ``target``) or PCM's sg student
    target_ema_decay: float = Field(0.95, ge=0, lt=1)  # decay of the target EMA (LCM's 0.95)
    loss_type: Literal["l2", "huber"] = "l2"  # "l2": Hyper-SD's "MSE" [V]; "huber": LCM's pseudo-Huber
    huber_c: float = Field(0.001, gt=0)  # pseudo-Huber c (LCM's 0.001)
    adversarial: bool = False  # add the hinge-GAN head on frozen teacher features (role ``discriminator``, §2.2 [P])
    adv_renoise: bool = True  # re-noise pred and target from t_end up into the segment before the head (PCM)
    disc_hidden: int = Field(64, ge=1)  # hidden channels of the discriminator head
    critic_steps: int = Field(1, ge=1)  # discriminator updates per generator update


class CdConfig(TscdConfig):
    """Plain consistency distillation: TSCD with one segment throughout (the baseline)."""
    name: Literal["cd"] = "cd"
    stages: list[StageSection] = Field(default_factory=lambda: [StageSection(segments=1)], min_length=1)

    @field_validator("stages")
    @classmethod
    def _one_segment(cls, v: list[StageSection]) -> list[StageSection]:
        if any(s.segments != 1 for s in v):
            raise ValueError("cd has one segment in every stage (use method.name=tscd for more)")
        return v


def consistency_distance(pred: Tensor, target: Tensor, loss_type: str, huber_c: float) -> Tensor:
    """Per-sample distance (B,): mean squared error, or LCM's pseudo-Huber mean(sqrt(d^2 + c^2) - c)."""
    diff = (pred - target).flatten(1)
    if loss_type == "l2":
        return diff.pow(2).mean(1)
    return ((diff.pow(2) + huber_c ** 2).sqrt() - huber_c).mean(1)


class Tscd(Method):
    """TSCD / CD loss object; the role set depends on the config (see the module docstring)."""
    batch = "data"

    def __init__(self, config: TscdConfig):
        super().__init__(config)
        self.stage = 0

    def roles(self) -> list[RoleSpec]:
        """generator (teacher copy, full or LoRA), teacher, [discriminator head: critic],
        [target: EMA of the generator with decay target_ema_decay]."""
        cfg = self.config
        out = [RoleSpec("generator", "generator", "custom", build=partial(build_student, cfg=cfg)),
               RoleSpec("teacher", "frozen", "teacher")]
        if cfg.adversarial:
            out.append(RoleSpec("discriminator", "critic", "custom",
                                build=lambda teacher: build_discriminator(teacher, cfg.disc_hidden)))
        if cfg.target_network == "ema":
            out.append(RoleSpec("target", "frozen", "ema", source="generator", decay=cfg.target_ema_decay))
        return out

    # ---------------------------------------------------------------- trainer hooks
    def set_global_step(self, step: int) -> int:
        """Select the stage for global step ``step`` (generator updates done); returns its index."""
        self.stage = seg.stage_at(step, [s.steps for s in self.config.stages])
        return self.stage

    @property
    def segments(self) -> int:
        return self.config.stages[self.stage].segments

    def critic_steps(self) -> int:
        return self.config.critic_steps if self.config.adversarial else 0

    # ---------------------------------------------------------------- the pair
    def consistency_pair(self, x0: Tensor, cond, *, generator, teacher, target) -> dict[str, Tensor]:
        """Student prediction and its target, both at t_end (B, ...), and the timesteps (B,) (times
        on a flow schedule, where every move is the Euler step of the network's (x0, eps) pair)."""
        cfg, sched = self.config, teacher.schedule
        B, dev = x0.shape[0], x0.device
        segs = seg.segments_of(sched, self.segments, cfg.edges, cfg.timesteps, cfg.num_ddim_timesteps)
        allowed = segs.allowed.to(dev)
        t_n = allowed[torch.randint(len(allowed), (B,), device=dev)]
        edge = segs.lower_edge(t_n)
        t_prev = seg.teacher_prev(t_n, segs.skip, edge)
        t_end = seg.target_time(t_prev, edge, cfg.target)
        x_tn = sched.add_noise(x0, torch.randn_like(x0), t_n)
        with torch.no_grad():
            guided = CFGDenoiser(teacher, cfg.teacher_guidance_scale) if cfg.teacher_guidance_scale != 1.0 else teacher
            # the teacher's ODE step (DDIM; Euler on flow) t_n -> t_{n-1}, inside the segment
            x_prev = seg.move_pair(sched, x_tn, *predict_pair(guided, x_tn, t_n, cond), t_n, t_prev)
            if bool((t_end < t_prev).any()):
                pair = predict_pair(target, x_prev, t_prev.clamp(min=0), cond)
                tgt = seg.move_pair(sched, x_prev, *pair, t_prev, t_end)  # = x_prev where t_end == t_prev
            else:
                tgt = x_prev
        pred = seg.move_pair(sched, x_tn, *predict_pair(generator, x_tn, t_n, cond), t_n, t_end)
        return {"pred": pred, "target": tgt.detach(), "x_t": x_tn, "x_prev": x_prev, "t_n": t_n, "t_prev": t_prev,
                "t_end": t_end, "edge": edge, "top": segs.top(t_n)}

    def _target_net(self, generator, target):
        if self.config.target_network == "online":
            return generator  # evaluated under no_grad: stop-gradient
        if target is None:
            raise ValueError("target_network = 'ema' needs the frozen role 'target' (an EMA of the generator)")
        return target

    def _adv_point(self, sched, x: Tensor, p: dict[str, Tensor], t_adv: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        if not self.config.adv_renoise:
            return x, p["t_end"].clamp(min=0)
        return seg.renoise(sched, x, p["t_end"], t_adv, noise), t_adv

    def _adv_time(self, p: dict[str, Tensor]) -> Tensor:
        lo = p["t_end"] + 1  # (t_end, top]
        span = (p["top"] - lo + 1).clamp(min=1)
        return lo + (torch.rand(lo.shape, device=lo.device) * span).floor().long().clamp(max=span - 1)

    # ---------------------------------------------------------------- losses
    def generator_loss(self, batch: Batch, *, generator, teacher, target=None, discriminator=None, **_) -> LossOut:
        cfg = self.config
        check_student(generator, cfg)
        if batch.x0 is None:
            raise ValueError(f"{cfg.name} needs data batches (x0)")
        stage = cfg.stages[self.stage]
        p = self.consistency_pair(batch.x0, batch.cond, generator=generator, teacher=teacher,
                                  target=self._target_net(generator, target))
        cons = consistency_distance(p["pred"], p["target"], cfg.loss_type, cfg.huber_c)
        loss = stage.consistency_weight * cons
        metrics = {"loss/consistency": cons.detach().mean(), "tscd/segments": torch.tensor(float(self.segments)),
                   "tscd/stage": torch.tensor(float(self.stage)),
                   "tscd/t_end": p["t_end"].double().mean().float()}
        if cfg.adversarial and stage.adv_weight > 0:
            if discriminator is None:
                raise ValueError("adversarial = true needs the trainable role 'discriminator'")
            t_adv = self._adv_time(p)
            x_adv, t_in = self._adv_point(teacher.schedule, p["pred"], p, t_adv, torch.randn_like(p["pred"]))
            adv = hinge_g(discriminate(discriminator, teacher, x_adv, t_in, batch.cond, grad_to_input=True))
            loss = loss + stage.adv_weight * adv
            metrics["loss/adv_g"] = adv.detach().mean()
        return LossOut(loss, metrics)

    def critic_loss(self, batch: Batch, *, generator, teacher, discriminator, target=None, **_) -> LossOut:
        if batch.x0 is None:
            raise ValueError(f"{self.config.name} needs data batches (x0)")
        with torch.no_grad():
            p = self.consistency_pair(batch.x0, batch.cond, generator=generator, teacher=teacher,
                                      target=self._target_net(generator, target))
            t_adv = self._adv_time(p)
            noise = torch.randn_like(p["pred"])
            real, t_in = self._adv_point(teacher.schedule, p["target"], p, t_adv, noise)
            fake, _ = self._adv_point(teacher.schedule, p["pred"], p, t_adv, noise)
        d_real = discriminate(discriminator, teacher, real, t_in, batch.cond, grad_to_input=False)
        d_fake = discriminate(discriminator, teacher, fake, t_in, batch.cond, grad_to_input=False)
        loss = hinge_d(d_real, d_fake)
        return LossOut(loss, {"loss/adv_d": loss.detach().mean(), "adv/d_real": d_real.detach().mean(),
                              "adv/d_fake": d_fake.detach().mean()})

    # ---------------------------------------------------------------- sampling / export
    def sample(self, generator, z: Tensor, cond: Tensor) -> Tensor:
        """k-step DDIM, trailing spacing (k = the current stage's segments): the N-step LoRA sampler;
        on rectified flow k-step Euler on the schedule's grid, whose steps land on the segment edges."""
        if isinstance(generator.schedule, RectifiedFlow):
            return sample_euler(generator, z, cond, self.segments)
        return sample_ddim(generator, z, cond, self.segments, spacing="trailing")

    def sampler(self, generator) -> SamplerSpec:
        sched = generator.schedule
        k, T = self.segments, sched.num_train_timesteps
        few = (FewStep("euler", k, sched.spacing, 1.0) if isinstance(sched, RectifiedFlow)
               else FewStep("ddim", k, "trailing", 1.0))
        # one trailing DDIM (or Euler) step from T - 1 (t = 1) is one x0 call on z: at k = 1 a 1-step generator
        return SamplerSpec(one_step=OneStepCall(T - 1, NoiseInput.unit) if k == 1 else None, few_step=few,
                           notes={"tscd": {"segments": k, "stage": self.stage, "edges": self.config.edges.value,
                                           "student": self.config.student}})
