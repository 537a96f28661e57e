"""The networks and inputs of the GPU training benchmark (``hyperscale.bench.gpu``, docs/benchmarks.md §11).

A shape is a UNet2DConditionModel config of the ``sd15`` or ``sdxl`` family plus the text
conditioning it reads, built with random weights (no download):

- ``sd15``: SD 1.5's UNet (859.5 M parameters), 64x64x4 latents, 77x768 text states;
- ``sdxl``: SDXL's UNet (2.567 B), 128x128x4 latents, 77x2048 text states (CLIP-L's 768 and
  OpenCLIP-G's 1280 concatenated), a 1280-wide pooled embedding and the six size/crop time ids;
- ``tiny`` and ``tiny-xl``: the same block structure (block types, layers per block, the SDXL
  transformer depths and added time/text embedding) with small channels, for CPU and the tests.

The denoiser is the project's own ``T2IDenoiser`` of the family (so every method calls the
network exactly as in training: ``TextToImageFamily.call``, the schedule, the prediction
conversions); only its frontend differs: ``TensorFrontend`` holds no tokenizer, text encoder or
VAE, because the benchmark hands the conditions in as random tensors (a ``Cond``, as caption
shards with precomputed embeddings do) and generates latents directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hyperscale.models.cond import Cond
from hyperscale.models.families import family_named
from hyperscale.models.families.text2image import Frontend, T2IDenoiser

# SD 1.5's and SDXL's training noise schedule (their scheduler configs): VP, scaled linear, eps prediction
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

_SD15_BLOCKS = {"down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "layers_per_block": 2}
_SDXL_BLOCKS = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "layers_per_block": 2,
                "addition_embed_type": "text_time", "use_linear_projection": True}


@dataclass(frozen=True)
class Shape:
    """One benchmark network. ``text_widths``: the widths of the text encoders whose token states are
    concatenated (SDXL: two); ``pooled_width``/``time_id_width``: SDXL's added embedding (None for SD 1.5)."""
    name: str
    family: str
    unet: dict
    batch_size: int  # default per-step batch (per role update)
    text_len: int = 77
    text_widths: tuple[int, ...] = (768,)
    pooled_width: int | None = None
    about: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def latent(self) -> tuple[int, int, int]:
        s = self.unet["sample_size"]
        return (self.unet.get("in_channels", 4), s, s)

    def describe(self) -> dict:
        return {"family": self.family, "latent": list(self.latent), "text_states": [self.text_len, sum(self.text_widths)],
                "text_widths": list(self.text_widths), "pooled_width": self.pooled_width, "unet": self.unet,
                "about": self.about}


SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("sd15", "sd15", dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                               cross_attention_dim=768, attention_head_dim=8, **_SD15_BLOCKS),
          batch_size=4, about="Stable Diffusion 1.5's UNet config (859.5 M parameters), random weights"),
    Shape("sdxl", "sdxl", dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                               transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                               cross_attention_dim=2048, addition_time_embed_dim=256,
                               projection_class_embeddings_input_dim=6 * 256 + 1280, **_SDXL_BLOCKS),
          batch_size=2, text_widths=(768, 1280), pooled_width=1280,
          about="SDXL base's UNet config (2.567 B parameters), random weights"),
    Shape("tiny", "sd15", dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32, 32),
                               cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, **_SD15_BLOCKS),
          batch_size=2, text_widths=(32,), about="sd15's block structure with small channels (CPU, tests)"),
    Shape("tiny-xl", "sdxl", dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
                                  transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
                                  cross_attention_dim=64, addition_time_embed_dim=8,
                                  projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8, **_SDXL_BLOCKS),
          batch_size=2, text_widths=(32, 32), pooled_width=32,
          about="sdxl's block structure (depths 1/1/2, two text widths, pooled + time ids) with small channels"),
]}


def shape_named(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown benchmark shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


class TensorFrontend(Frontend):
    """A frontend without tokenizers, text encoders or VAE: conditions arrive as tensors. The null
    condition (classifier-free guidance) is all zeros, SDXL's empty prompt under
    ``force_zeros_for_empty_prompt``."""

    def __init__(self, family, sample_size: int, null: Cond):
        super().__init__(family, Path("<random-conditions>"), sample_size)
        self._null_row = null

    @property
    def pipe(self):
        raise RuntimeError("the GPU benchmark's denoisers have no text encoders or VAE: pass a Cond")

    def null(self, n: int, device=None) -> Cond:
        return Cond.cat([self._null_row] * n).to(device)


def random_cond(shape: Shape, n: int, device, generator: torch.Generator | None = None, zeros: bool = False) -> Cond:
    """``n`` random text conditions of ``shape``: token states (n, L, sum(widths)) built per encoder width,
    SDXL's pooled embedding and its time ids (original size, crop 0 0, target size: the latent side x 8)."""
    def draw(*size: int) -> Tensor:
        return torch.zeros(size) if zeros else torch.randn(size, generator=generator)

    embeds = torch.cat([draw(n, shape.text_len, w) for w in shape.text_widths], dim=-1)
    if shape.pooled_width is None:
        return Cond(embeds=embeds).to(device)
    side = float(shape.latent[-1] * 8)
    ids = torch.tensor([[side, side, 0.0, 0.0, side, side]]).repeat(n, 1)
    return Cond(embeds=embeds, pooled=draw(n, shape.pooled_width), extra={"time_ids": ids}).to(device)


def build_denoiser(shape: Shape, device: torch.device | str = "cpu") -> T2IDenoiser:
    """The family's denoiser around a UNet of ``shape`` with random weights, initialised on ``device``
    (an 860 M / 2.6 B network initialises in seconds on a GPU), eps prediction, SD's schedule."""
    from diffusers import UNet2DConditionModel

    family = family_named(shape.family)
    with torch.device(device):
        net = UNet2DConditionModel(**shape.unet)
    schedule = family.schedule_of(SD_SCHEDULER, net, shape.latent[-1])
    frontend = TensorFrontend(family, shape.latent[-1], random_cond(shape, 1, "cpu", zeros=True))
    return T2IDenoiser(family, schedule, "epsilon", net.eval(), frontend)
