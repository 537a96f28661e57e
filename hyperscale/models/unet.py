"""Adapter: diffusers ``UNet2DModel`` with class labels -> ``Denoiser``.

The class-conditional pixel-space teacher of the CPU-scale domain (docs/design.md §5).
The class embedding table has ``num_classes + 1`` rows; the last row is the null
label that classifier-free guidance uses.

Seams for the SD family (``UNet2DConditionModel`` + text encoders + VAE) and for
PixArt are other ``BaseDenoiser`` subclasses registered in ``models.build``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hyperscale.diffusion.schedule import Prediction, Schedule
from hyperscale.models.denoiser import BaseDenoiser


class ClassUNetDenoiser(BaseDenoiser):
    def __init__(self, schedule: Schedule, unet_config: dict[str, Any],
                 prediction_type: Prediction | str = Prediction.eps):
        super().__init__(schedule, prediction_type)
        from diffusers import UNet2DModel  # heavy import kept local

        self.unet_config = dict(unet_config)
        self.unet = UNet2DModel(**self.unet_config)
        self.num_classes = int(self.unet_config["num_class_embeds"]) - 1

    def null_cond(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, self.num_classes)

    def raw(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            cond = torch.full((x_t.shape[0],), self.num_classes, device=x_t.device, dtype=torch.long)
        return self.unet(x_t, t, class_labels=cond).sample


def unet_config(sample_size: int, in_channels: int, block_out_channels: list[int],
                layers_per_block: int, num_classes: int, attention_levels: list[bool],
                dropout: float = 0.0) -> dict[str, Any]:
    """A diffusers UNet2DModel config for the class-conditional pixel denoiser."""
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    return dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                down_block_types=tuple(down), up_block_types=tuple(up),
                num_class_embeds=num_classes + 1, norm_num_groups=min(32, min(block_out_channels)),
                attention_head_dim=8, dropout=dropout, add_attention=True)
