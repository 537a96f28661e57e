"""Pieces shared by the score-distillation methods (SIM, DMD): the online fake
score's denoising score matching, 1-step generator sampling, and student construction."""
from __future__ import annotations

import copy
from typing import Annotated, Literal, Optional

import torch
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from hyperscale.config.schema import MethodSection
from hyperscale.diffusion.schedule import Prediction, RectifiedFlow
from hyperscale.diffusion.timedist import TimeDist
from hyperscale.methods.base import LossOut
from hyperscale.models.cond import cond_len
from hyperscale.models.denoiser import check_sigma_range, unwrap
from hyperscale.models.generator import sample_shape


def _check_range(r: tuple[float, float]) -> tuple[float, float]:
    if not 0 <= r[0] <= r[1] <= 1:
        raise ValueError(f"must satisfy 0 <= lo <= hi <= 1, got {tuple(r)}")
    return r


# a (lo, hi) pair of fractions of the training grid, or quantiles (diffusion/timedist.py)
TimeRange = Annotated[tuple[float, float], AfterValidator(_check_range)]


# a (lo, hi] interval of VE noise levels sigma~ (a guidance interval, docs/algorithms.md §1.7)
SigmaRange = Annotated[tuple[float, float], AfterValidator(check_sigma_range)]


def fake_score_dsm(fake_score, x0: Tensor, cond, times: TimeDist,
                   weighting: Literal["uniform", "min_snr"] = "uniform", min_snr_gamma: float = 5.0) -> LossOut:
    """Denoising score matching of the online fake score on (detached) generator samples x0
    (B, ...) with the teacher's own loss: eps-MSE, t drawn from ``times`` (DMD2: uniform on the
    grid, docs/algorithms.md §1.5 / §2.4), optional Min-SNR weighting. Per-sample (B,).
    On rectified flow the teacher's loss is the flow-matching MSE on v = eps - x0 (SD3, FLUX):
    eps-MSE / alpha^2, which, unlike eps-MSE, still trains the model at t = 1."""
    sched = fake_score.schedule
    flow = isinstance(sched, RectifiedFlow)
    if flow and weighting == "min_snr":
        raise ValueError("fake_weighting 'min_snr' weights an eps loss on a VP schedule; a rectified-flow "
                         "fake score trains with the flow-matching loss: use fake_weighting=uniform")
    t = times.draw(sched, x0.shape[0], x0.device)
    eps = torch.randn_like(x0)
    pred = fake_score(sched.add_noise(x0, eps, t), t, cond, out=Prediction.flow if flow else Prediction.eps)
    mse = (pred - (eps - x0 if flow else eps)).pow(2).flatten(1).mean(1)
    per = mse
    if weighting == "min_snr":
        # eps-loss weight min(SNR, gamma) / SNR (Min-SNR, eq. 8)
        snr = sched.snr(t).to(mse.dtype)
        per = mse * torch.clamp(snr, max=min_snr_gamma) / snr
    return LossOut(per, {"loss/fake_dsm": mse.detach().mean()})


def generator_noise(generator, cond) -> Tensor:
    """Standard normal z (B, C, H, W) for a generator's data shape, in its parameter dtype."""
    p = next(iter(generator.parameters()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    return torch.randn((cond_len(cond),) + sample_shape(generator), device=cond.device, dtype=dtype)


class StudentSection(MethodSection):
    """How the student (the generator role) is built from the teacher: a full copy or a peft LoRA on
    its UNet (Hyper-SD trains LoRAs, docs/algorithms.md §2.2 [P]); the LoRA flags are the diffusers scripts'."""
    name: str
    student: Literal["full", "lora"] = "full"  # "full" fine-tunes a copy of the teacher; "lora" trains a LoRA on it
    lora_rank: int = Field(64, ge=1)  # LoRA rank (PCM's / Hyper-SD's SD value: 64 [R])
    lora_alpha: Optional[float] = Field(None, gt=0)  # LoRA alpha; None: alpha = rank (scale 1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA branch
    lora_target_modules: Optional[list[str]] = None  # None: LCM-LoRA's list, filtered to the modules the UNet has
    # an earlier phase's export to start from (local, hub, s3://; "lora" continues its LoRA); None: the teacher copy
    init_student: Optional[str] = None


def build_student(teacher: nn.Module, cfg: StudentSection) -> nn.Module:
    """A trainable copy of the teacher, LoRA-wrapped when ``cfg.student == "lora"``, started from
    ``cfg.init_student`` when given (the file reading lives in ``hyperscale.models.lora``)."""
    student = copy.deepcopy(teacher)
    if cfg.init_student:
        from hyperscale.storage.local import absolute_local
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

        if unwrap(generator, lambda m: isinstance(m, LoraDenoiser)) is None:
            raise TypeError("method.student = 'lora' but the generator role carries no LoRA: build the roles "
                            "from method.roles() (hyperscale.methods.roles.build_roles)")
