"""The ``Denoiser`` protocol: every backbone is seen by methods and samplers only through it.

A denoiser maps (x_t, t, cond) to a prediction in the caller's choice of
parameterisation (eps / x0 / v / score). Backbone specifics (diffusers
``UNet2DModel`` with class labels today; ``UNet2DConditionModel`` + text encoders
+ VAE for SD and the PixArt transformer behind the same seam) live in adapters.
Classifier-free guidance is a wrapper, so losses never branch on it.

Shapes: x_t (B, C, H, W); t (B,) or a scalar: continuous time in [0, 1] (float) or an index
on the schedule's training grid (integer; diffusion/schedule.py);
cond is backbone specific: a (B,) long tensor of class labels here, where label
``num_classes`` is the "null" class used for CFG.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from hyperscale.diffusion.schedule import Prediction, Schedule, as_time, cfg_combine, convert
from hyperscale.models.cond import cond_cat


@runtime_checkable
class Denoiser(Protocol):
    schedule: Schedule
    prediction_type: Prediction

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None,
                 out: Prediction | str = Prediction.eps) -> Tensor: ...

    def null_cond(self, cond: Tensor) -> Tensor: ...


class BaseDenoiser(nn.Module):
    """Holds the schedule and does the prediction-type conversion; subclasses implement ``raw``,
    which sees the network's own timestep (``schedule.model_time``: the grid index of a VP
    schedule, 1000 sigma for rectified flow)."""

    def __init__(self, schedule: Schedule, prediction_type: Prediction | str = Prediction.eps):
        super().__init__()
        self.schedule = schedule
        self.prediction_type = Prediction(prediction_type)

    def raw(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None,
                out: Prediction | str = Prediction.eps) -> Tensor:
        t = batch_times(t, x_t)
        pred = self.raw(x_t, self.schedule.model_time(t), cond)
        alpha, sigma = self.schedule.alpha_sigma(t, dtype=x_t.dtype)
        return convert(pred, x_t, alpha, sigma, self.prediction_type, out)


def batch_times(t, x_t: Tensor) -> Tensor:
    """Times (B,) on x_t's device: a grid index stays an integer, continuous time stays float."""
    t = as_time(t).to(x_t.device)
    return t.expand(x_t.shape[0]) if t.ndim == 0 else t


def check_sigma_range(r: tuple[float, float]) -> tuple[float, float]:
    """A guidance interval (lo, hi] of VE noise levels sigma~, as floats; 0 <= lo < hi or ValueError."""
    if not 0 <= r[0] < r[1]:
        raise ValueError(f"guidance sigma range must satisfy 0 <= lo < hi (VE noise levels sigma~), got {tuple(r)}")
    return float(r[0]), float(r[1])


class CFGDenoiser(nn.Module):
    """Classifier-free guidance around any denoiser: one batched call on [uncond; cond].

    ``sigma_range`` (lo, hi): guide only samples whose VE noise level sigma~ lies in (lo, hi],
    scale 1 elsewhere (Kynkaenniemi et al. 2024, "Applying guidance in a limited interval",
    docs/algorithms.md §1.7); None guides every level."""

    def __init__(self, inner: nn.Module, guidance_scale: float,
                 sigma_range: tuple[float, float] | None = None):
        super().__init__()
        self.inner = inner
        self.guidance_scale = float(guidance_scale)
        self.sigma_range = None if sigma_range is None else check_sigma_range(sigma_range)

    @property
    def schedule(self) -> Schedule:
        return self.inner.schedule

    @property
    def prediction_type(self) -> Prediction:
        return self.inner.prediction_type

    def null_cond(self, cond: Tensor) -> Tensor:
        return self.inner.null_cond(cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None,
                out: Prediction | str = Prediction.eps) -> Tensor:
        if self.guidance_scale == 1.0 or cond is None:
            return self.inner(x_t, t, cond, out=out)
        t = batch_times(t, x_t)
        # Guidance combines eps (a linear function of x0/v/score at fixed x_t, so any works).
        both = self.inner(torch.cat([x_t, x_t]), torch.cat([t, t]),
                          cond_cat([self.null_cond(cond), cond]), out=out)
        uncond, cnd = both.chunk(2)
        return cfg_combine(uncond, cnd, self.scales(t, x_t))

    def scales(self, t: Tensor, x_t: Tensor) -> Tensor | float:
        """The guidance scale per sample, (B, 1, ...) on x_t's dtype; a float without an interval."""
        if self.sigma_range is None:
            return self.guidance_scale
        s = self.schedule.sigma_ve(t).to(x_t.device)
        inside = (s > self.sigma_range[0]) & (s <= self.sigma_range[1])
        w = torch.where(inside, self.guidance_scale, 1.0).to(x_t.dtype)
        return w.view(-1, *([1] * (x_t.ndim - 1)))


def unwrap(module, until: Callable[[object], bool]):
    """The first module for which ``until`` holds, looking through wrappers: DeepSpeed engines'
    and data-parallel wrappers' ``module`` (first: an engine forwards unknown attributes, ``inner``
    included, to its module), then CFG's and LoRA's ``inner``; None if none does."""
    seen = set()
    while module is not None and id(module) not in seen:
        if until(module):
            return module
        seen.add(id(module))
        wrapped = vars(module).get("_modules", {}).get("module") if isinstance(module, nn.Module) else None
        module = wrapped if wrapped is not None else getattr(module, "inner", None)
    return None
