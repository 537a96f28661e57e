"""What every method shares: the ``LossOut`` record and the method base class.

A method is a small loss object, pure PyTorch (no Ray, no DeepSpeed, no I/O).
Models arrive by role as keyword arguments. The trainer's generic two-player
step calls ``critic_loss`` ``critic_steps`` times, then ``generator_loss`` once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class LossOut:
    """``loss``: per-sample losses, shape (B,). ``metrics``: detached scalars, flat keys."""
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """x0: (B, C, H, W) data in [-1, 1] (absent for data-free methods); cond: (B,) labels."""
    cond: Tensor
    x0: Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.cond.to(device), None if self.x0 is None else self.x0.to(device))


class Method:
    """Base class. Subclasses set the role names and implement the losses.

    ``trainable``: roles the trainer builds with an optimizer and EMA on the
    first one (the generator). ``critic``: the role updated by ``critic_loss``
    (None for single-player methods). ``init_from_teacher``: trainable roles that
    start as copies of the frozen teacher. ``needs_data``: whether batches carry x0.
    """
    trainable: ClassVar[tuple[str, ...]] = ("generator",)
    critic: ClassVar[str | None] = None
    init_from_teacher: ClassVar[tuple[str, ...]] = ()
    needs_teacher: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True

    def __init__(self, config):
        self.config = config

    def critic_steps(self) -> int:
        return 0

    def generator_loss(self, batch: Batch, **roles) -> LossOut:
        raise NotImplementedError

    def sample(self, generator, z: Tensor, cond: Tensor) -> Tensor:
        """Images (B, C, H, W) from noise z with the trained generator (for grids and evaluation)."""
        raise NotImplementedError

    def export_meta(self, generator) -> dict:
        """Extra metadata stored with the exported generator (e.g. how a 1-step generator samples)."""
        return {}

    def critic_loss(self, batch: Batch, **roles) -> LossOut:
        raise NotImplementedError
