"""A servable 1-step generator: a denoiser called once on noise at a fixed timestep.

Exported like any denoiser (``model.safetensors`` + ``hyperscale_model.json``) with
``extra.generator = {"timestep": t, "noise_input": "sigma"|"unit"}``, so it loads
without the trainer or Ray: ``load_generator(dir)(z, labels)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from hyperscale.diffusion.sampling import NoiseInput, one_step
from hyperscale.models.build import EXPORT_META, load_denoiser, resolve_source


def sample_shape(denoiser) -> tuple[int, ...]:
    """Per-sample shape (C, H, W) of a denoiser's data: a ``sample_shape`` attribute, else the
    UNet adapter's ``unet_config``; CFG wrappers are looked through."""
    while not hasattr(denoiser, "sample_shape") and hasattr(denoiser, "inner"):
        denoiser = denoiser.inner
    if hasattr(denoiser, "sample_shape"):
        return tuple(denoiser.sample_shape)
    cfg = denoiser.unet_config
    size = cfg["sample_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg["in_channels"]),) + size


class OneStepGenerator(nn.Module):
    def __init__(self, denoiser: nn.Module, timestep: int, noise_input: NoiseInput | str = NoiseInput.sigma):
        super().__init__()
        self.denoiser, self.timestep, self.noise_input = denoiser, int(timestep), NoiseInput(noise_input)

    def forward(self, z: Tensor, cond: Tensor) -> Tensor:
        """z: (B, C, H, W) standard normal; cond: (B,) labels -> x0 (B, C, H, W)."""
        return one_step(self.denoiser, z, cond, self.timestep, self.noise_input)

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn((len(labels), *sample_shape(self.denoiser)), generator=generator)
        return self(z, labels).clamp(-1, 1)


def export_extra(source: str | os.PathLike) -> dict:
    """``extra`` of an export's metadata."""
    return json.loads((Path(resolve_source(str(source))) / EXPORT_META).read_text()).get("extra", {})


def one_step_call(extra: dict) -> dict | None:
    """How a multi-step export (``extra.multi_step``: the Hyper-SD unified LoRA) samples at 1 step:
    the ``extra.generator`` call its last (DMD) phase trained, as Hyper-SD's 1-step sampling uses
    its own timestep (800 for SDXL) rather than the trailing T - 1. None: no such call."""
    return extra.get("generator") if extra.get("multi_step") else None


def samples_with_call(call: dict | None, steps: int, sampler: str) -> bool:
    """The one rule for every sampler of a multi-step export (Serve, the benchmark): 1 step with
    TCD goes through the export's own 1-step call (``one_step_call``); DDIM keeps its trailing
    grid, every other step count the sampler's."""
    return call is not None and steps == 1 and sampler == "tcd"


def load_generator(source: str | os.PathLike) -> OneStepGenerator:
    path = resolve_source(str(source))
    extra = export_extra(path)
    if "generator" not in extra:
        raise ValueError(f"{path}: an export of a multi-step denoiser, not a 1-step generator "
                         f"(no extra.generator in {EXPORT_META})")
    g = extra["generator"]
    return OneStepGenerator(load_denoiser(path), g["timestep"], g["noise_input"]).eval()
