"""A small discriminator on frozen teacher features (SDXL-Lightning / PCM style, docs/algorithms.md §2.2).

The frozen teacher's feature taps (its family's ``features``: for a UNet every down block's
output and the mid block's output) are read on a noised sample; one light head per level (3x3
conv, SiLU, 1x1 conv to one logit map, spatial mean) turns each level into a logit, and the
logits are summed: a multi-head patch discriminator. The teacher stays frozen (the trainer
freezes its parameters); gradients reach the generator through the features' input. Losses are
the hinge GAN pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperscale.models.families import family_of


def feature_channels(teacher: nn.Module) -> list[int]:
    """Channels of each feature level ``teacher_features`` returns (the family's taps)."""
    return family_of(teacher).feature_channels(teacher)


def teacher_features(teacher: nn.Module, x_t: Tensor, t: Tensor, cond) -> list[Tensor]:
    """The teacher's feature maps at (x_t, t, cond), one (B, C_l, H_l, W_l) per level: the family
    says which (a UNet's down blocks and mid block; the decoder is never run)."""
    return family_of(teacher).features(teacher, x_t, t, cond)


class FeatureDiscriminator(nn.Module):
    """One head per feature level; ``forward(features) -> logits (B,)``."""

    def __init__(self, channels: list[int], hidden: int = 64):
        super().__init__()
        self.channels = list(channels)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.GroupNorm(min(32, hidden), hidden), nn.SiLU(),
                          nn.Conv2d(hidden, 1, 1))
            for c in channels)

    def forward(self, features: list[Tensor]) -> Tensor:
        return sum(h(f.to(h[0].weight.dtype)).flatten(1).mean(1) for h, f in zip(self.heads, features))


def hinge_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss per sample (B,): ReLU(1 - D(real)) + ReLU(1 + D(fake))."""
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)


def hinge_g(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss per sample (B,): -D(fake)."""
    return -fake_logits


def build_discriminator(teacher: nn.Module, hidden: int = 64) -> FeatureDiscriminator:
    """A fresh head sized for the teacher's feature levels, in the teacher's dtype and device."""
    p = next(iter(teacher.parameters()))
    return FeatureDiscriminator(feature_channels(teacher), hidden).to(device=p.device, dtype=p.dtype)


def discriminate(disc: nn.Module, teacher: nn.Module, x: Tensor, t: Tensor, cond, *, grad_to_input: bool) -> Tensor:
    """Logits (B,) of ``disc`` on teacher features of x at t. ``grad_to_input``: keep the graph
    through the teacher to x (generator step); else the features are computed without grad
    (discriminator step: only the head learns, nothing reaches the teacher or the generator)."""
    if grad_to_input:
        return disc(teacher_features(teacher, x, t, cond))
    with torch.no_grad():
        feats = teacher_features(teacher, x.detach(), t, cond)
    return disc([f.detach() for f in feats])
