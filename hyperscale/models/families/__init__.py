"""The families table: a family's name (``model.family`` in the config, ``family`` in an export's
metadata) -> its ``Family`` (hyperscale/models/family.py)."""
from __future__ import annotations

from torch import nn

from hyperscale.models.families.class_unet import ClassUNet
from hyperscale.models.families.flux import Flux
from hyperscale.models.families.pixart import PixArt
from hyperscale.models.families.sd import SD15, SDXL
from hyperscale.models.families.sd3 import SD3
from hyperscale.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (ClassUNet(), SD15(), SDXL(), PixArt(), SD3(), Flux())}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family '{name}'; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_of(denoiser: nn.Module) -> Family:
    """The family of a denoiser, looking through CFG, LoRA and engine wrappers."""
    from hyperscale.models.denoiser import unwrap

    for family in FAMILIES.values():
        if unwrap(denoiser, family.owns) is not None:
            return family
    raise TypeError(f"{type(denoiser).__name__} belongs to no registered model family")
