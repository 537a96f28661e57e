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
from hyperscale.models.denoiser import unwrap
from hyperscale.models.families import family_of
from hyperscale.models.build import EXPORT_META, load_denoiser, resolve_source
from hyperscale.models.export import SamplerSpec


def sample_shape(denoiser) -> tuple[int, ...]:
    """Per-sample shape (e.g. (C, H, W)) of a denoiser's data: a ``sample_shape`` attribute (the
    toy denoisers), else its family's; wrappers are looked through."""
    shaped = unwrap(denoiser, lambda m: hasattr(m, "sample_shape"))
    if shaped is not None:
        return tuple(shaped.sample_shape)
    return family_of(denoiser).sample_shape(denoiser)


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


def export_sampler(source: str | os.PathLike) -> SamplerSpec:
    """How an export samples (``extra`` of its metadata, models/export.py)."""
    return SamplerSpec.from_extra(export_extra(source))


def load_generator(source: str | os.PathLike) -> OneStepGenerator:
    path = resolve_source(str(source))
    spec = export_sampler(path)
    if spec.one_step is None:
        raise ValueError(f"{path}: an export of a multi-step denoiser, not a 1-step generator "
                         f"(no extra.generator in {EXPORT_META})")
    return OneStepGenerator(load_denoiser(path), spec.one_step.timestep, spec.one_step.noise_input).eval()
