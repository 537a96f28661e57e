"""Human-feedback learning for the low-step student (Hyper-SD §2.3; ReFL from ImageReward, Xu et al.
2023, arXiv 2304.05977).

ReFL-style truncated rollout: from noise, the student runs DDIM (trailing grid of
``rollout_steps``) without gradients down to a random step i, then predicts x0 at t_i with
gradients; each reward d scores x0 with its prompt/class and the loss per sample is

    L = sum_d w_d ReLU(alpha_d - r_d(x0, c))            (the hinge with a per-reward margin)

[+ teacher_reg_weight * MSE(x0, teacher's x0 at the same point), an optional anchor against
the domain shift the paper warns about]. The reward models come in as the frozen role
``reward`` (a ``hyperscale.models.rewards.RewardSet`` built outside methods by
``build_rewards(config.rewards)``), so this module does no I/O.

The structural (SOLO instance-segmentation on COCO) feedback of the paper is not implemented.
"""
from __future__ import annotations

from functools import partial
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from hyperscale.config.schema import Section
from hyperscale.diffusion.sampling import ddim_walk, timesteps
from hyperscale.diffusion.schedule import Prediction, RectifiedFlow
from hyperscale.methods.base import Batch, LossOut, Method, RoleSpec
from hyperscale.methods.scores import StudentSection, build_student, check_student, generator_noise
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import FewStep, SamplerSpec
from hyperscale.models.families import family_of


class RewardSpec(Section):
    """One reward: how the factory builds it (kind, source, head, template) and how the hinge uses it
    (margin alpha_d, weight w_d; docs/algorithms.md §2.3)."""
    name: str  # its key in the ``reward`` role
    kind: Literal["class_consistency", "aesthetic", "image_reward"]  # log p(c | x0), LAION aesthetic or ImageReward
    source: Optional[str] = None  # local path or hub id; None for class_consistency: the shipped assets/classifier
    head: Optional[str] = None  # aesthetic: the predictor's head file (a released *.pth) if not in source
    template: Optional[str] = None  # image_reward: prompt template for the class names ("{}" if None)
    margin: float = 0.0  # the hinge target alpha_d [P: not recovered]; ReFL: ReLU(2 - r) for ImageReward
    weight: float = Field(1.0, ge=0)  # w_d (ReFL's grad_scale is 1e-3 at its SD learning rate)


def _default_rewards() -> list[RewardSpec]:
    # log p(c | x0) >= log 0.9: samples the classifier already finds confidently on-class cost nothing
    return [RewardSpec(name="class", kind="class_consistency", margin=-0.105, weight=1.0)]


def reward_hinge(x0: Tensor, cond, reward: nn.Module, specs: list[RewardSpec]) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_d w_d ReLU(alpha_d - r_d(x0, c)) per sample (B,), and per-reward metrics."""
    loss = x0.new_zeros(x0.shape[0], dtype=torch.float32)
    metrics: dict[str, Tensor] = {}
    for s in specs:
        if s.name not in reward:
            raise ValueError(f"reward role has no model named '{s.name}' (has {list(reward.keys())})")
        r = reward[s.name](x0, cond).float()
        loss = loss + s.weight * F.relu(s.margin - r)
        metrics[f"reward/{s.name}"] = r.detach().mean()
    return loss, metrics


class FeedbackConfig(StudentSection):
    """Feedback's hyperparameters, one line each (docs/algorithms.md §2.3). The student fields (full or
    LoRA) come from ``StudentSection``; the teacher is needed either way (the student starts as its copy)."""
    name: Literal["feedback"] = "feedback"
    rewards: list[RewardSpec] = Field(default_factory=_default_rewards, min_length=1)  # names match the ``reward`` role
    rollout_steps: int = Field(4, ge=1)  # rollout steps, trailing DDIM (ReFL: 40); 4 suits a 4-step student
    grad_step_range: tuple[int, int] = (0, 3)  # inclusive step indices where x0 is predicted with grad (ReFL: [30, 39])
    guidance_scale: float = Field(1.0, ge=0)  # CFG of the student's rollout (1.0: distilled students sample unguided)
    teacher_reg_weight: float = Field(0.0, ge=0)  # MSE from the student's x0 to the teacher's at the same x_t; 0 = off

    @model_validator(mode="after")
    def _range(self) -> "FeedbackConfig":
        lo, hi = self.grad_step_range
        if not 0 <= lo <= hi < self.rollout_steps:
            raise ValueError(f"grad_step_range must satisfy 0 <= lo <= hi < rollout_steps, got {(lo, hi)}")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        return self


def truncated_rollout(student, z: Tensor, cond, num_steps: int, grad_index: int,
                      guidance_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """ReFL rollout: DDIM (trailing) from x_T = z without grad for ``grad_index`` steps, then the
    x0 prediction at that step with grad. Returns (x0 (B, ...), x_t (B, ...) detached, t (B,))."""
    sched = student.schedule
    if isinstance(sched, RectifiedFlow):
        raise ValueError("feedback's ReFL rollout walks a discrete (VP) grid; rectified-flow teachers (sd3, flux) "
                         "are not supported by the feedback phase yet")
    net = CFGDenoiser(student, guidance_scale) if guidance_scale != 1.0 else student
    ts = timesteps(num_steps, sched.num_train_timesteps, "trailing").tolist()
    with torch.no_grad():
        x = ddim_walk(net, z, cond, list(zip(ts[:grad_index], ts[1:grad_index + 1])))
    t = torch.full((x.shape[0],), ts[grad_index], dtype=torch.long, device=x.device)
    x = x.detach()
    return net(x, t, cond, out=Prediction.x0), x, t


class Feedback(Method):
    """Reward feedback on the student; roles: generator (trainable), teacher, reward (frozen)."""
    batch = "conditions"

    def roles(self) -> list[RoleSpec]:
        return [RoleSpec("generator", "generator", "custom", build=partial(build_student, cfg=self.config)),
                RoleSpec("teacher", "frozen", "teacher"),
                RoleSpec("reward", "frozen", "reward", rewards=tuple(self.config.rewards))]

    def generator_loss(self, batch: Batch, *, generator, reward, teacher=None, **_) -> LossOut:
        cfg = self.config
        check_student(generator, cfg)
        cond = batch.cond
        lo, hi = cfg.grad_step_range
        i = int(torch.randint(lo, hi + 1, ()))
        x0, x_t, t = truncated_rollout(generator, generator_noise(generator, cond), cond, cfg.rollout_steps, i,
                                       cfg.guidance_scale)
        family = family_of(generator)
        # rewards score images with their labels or prompts: latents go through the VAE (with gradients)
        images = family.decode(generator, x0) if family.condition == "text" else x0
        loss, metrics = reward_hinge(images, cond if batch.items is None else batch.items, reward, cfg.rewards)
        metrics["feedback/grad_t"] = t.float().mean()
        if cfg.teacher_reg_weight > 0:
            if teacher is None:
                raise ValueError("teacher_reg_weight > 0 needs the teacher role")
            with torch.no_grad():
                x0_teacher = teacher(x_t, t, cond, out=Prediction.x0)
            reg = (x0 - x0_teacher).pow(2).flatten(1).mean(1)
            loss = loss + cfg.teacher_reg_weight * reg
            metrics["loss/teacher_reg"] = reg.detach().mean()
        metrics["loss/feedback"] = loss.detach().mean()
        return LossOut(loss, metrics)

    def sample(self, generator, z: Tensor, cond: Tensor) -> Tensor:
        from hyperscale.diffusion.sampling import sample_ddim

        return sample_ddim(generator, z, cond, self.config.rollout_steps, spacing="trailing")

    def sampler(self, generator) -> SamplerSpec:
        return SamplerSpec(few_step=FewStep("ddim", self.config.rollout_steps, "trailing", self.config.guidance_scale))
