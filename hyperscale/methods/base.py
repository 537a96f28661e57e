"""What every method shares: the ``LossOut`` record and the method base class.

A method is a small loss object, pure PyTorch (no Ray, no DeepSpeed, no I/O). It declares
the models it needs as ``RoleSpec``s; the trainer builds them from that declaration
(``methods.roles.build_roles``) and passes them by role name as keyword arguments. The
trainer's generic two-player step calls ``critic_loss`` ``critic_steps`` times, then
``generator_loss`` once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import Tensor

from hyperscale.models.cond import Cond
from hyperscale.models.export import SamplerSpec


@dataclass
class LossOut:
    """``loss``: per-sample losses, shape (B,). ``metrics``: detached scalars, flat keys."""
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """x0: (B, ...) data as the denoiser generates it (absent for data-free methods); cond: a
    ``Cond`` (models/cond.py), or a (B,) tensor of class labels as its shorthand; items: the
    conditions as the data gave them (class labels, or B prompts: what text-aware rewards read)."""
    cond: Cond | Tensor
    x0: Tensor | None = None
    items: Tensor | list[str] | None = None

    def to(self, device: torch.device | str) -> "Batch":
        items = self.items.to(device) if isinstance(self.items, Tensor) else self.items
        return Batch(self.cond.to(device), None if self.x0 is None else self.x0.to(device), items)


RoleKind = Literal["generator", "critic", "frozen"]
RoleInit = Literal["teacher", "copy_of_teacher", "fresh", "ema", "reward", "custom"]


@dataclass(frozen=True)
class RoleSpec:
    """One model a method needs, and how the trainer builds it (``methods.roles.build_roles``).

    kind: ``generator`` (trained by ``generator_loss``, exported; exactly one), ``critic``
    (trained by ``critic_loss``; at most one) or ``frozen`` (never trained).
    init: ``teacher`` (the frozen teacher itself), ``copy_of_teacher``, ``fresh`` (the
    architecture of the model config, random weights), ``ema`` (an EMA of the role ``source``
    with ``decay``, updated after every generator update), ``reward`` (the reward models of
    ``rewards``) or ``custom`` (``build(teacher)``)."""
    name: str
    kind: RoleKind
    init: RoleInit
    source: str | None = None
    decay: float = 0.0
    rewards: tuple = ()
    build: Callable[[Any], Any] | None = field(default=None, compare=False)

    def __post_init__(self):
        if (self.init == "ema") != (self.source is not None):
            raise ValueError(f"role '{self.name}': init 'ema' and a source go together")
        if (self.init == "custom") != (self.build is not None):
            raise ValueError(f"role '{self.name}': init 'custom' and a build function go together")
        if self.kind != "frozen" and self.init in ("teacher", "ema", "reward"):
            raise ValueError(f"role '{self.name}': a {self.kind} cannot be initialised as '{self.init}'")


class Method:
    """Base class. Subclasses declare their roles (``roles``) and batches (``batch``) and
    implement the losses.

    ``batch``: ``data`` (x0 with its conditions) or ``conditions`` (conditions only: data-free).
    ``critic_steps``: critic updates per generator update. ``set_global_step``: told the number
    of generator updates done before each step (stage schedules)."""
    batch: ClassVar[Literal["data", "conditions"]] = "data"

    def __init__(self, config):
        self.config = config

    def roles(self) -> list[RoleSpec]:
        raise NotImplementedError

    def checked_roles(self) -> list[RoleSpec]:
        """``roles()``, checked: unique names, exactly one generator, at most one critic."""
        specs = self.roles()
        names = [r.name for r in specs]
        kinds = [r.kind for r in specs]
        problem = ("role names repeat" if len(set(names)) != len(names) else
                   f"{kinds.count('generator')} generator roles; exactly one is needed"
                   if kinds.count("generator") != 1 else
                   f"{kinds.count('critic')} critic roles; at most one is allowed" if kinds.count("critic") > 1 else None)
        if problem:
            raise TypeError(f"{type(self).__name__} declares {names}: {problem}")
        return specs

    @property
    def generator(self) -> str:
        return next(r.name for r in self.checked_roles() if r.kind == "generator")

    @property
    def critic(self) -> str | None:
        return next((r.name for r in self.checked_roles() if r.kind == "critic"), None)

    @property
    def trainable(self) -> tuple[str, ...]:
        """The trained roles, generator first."""
        return (self.generator,) + ((self.critic,) if self.critic else ())

    @property
    def needs_teacher(self) -> bool:
        return any(r.init in ("teacher", "copy_of_teacher", "custom") for r in self.roles())

    def critic_steps(self) -> int:
        return 0

    def set_global_step(self, step: int) -> None:
        """Stage schedules (TSCD's 8 -> 4 -> 2 -> 1 segments) read the step here."""

    def generator_loss(self, batch: Batch, **roles) -> LossOut:
        raise NotImplementedError

    def sample(self, generator, z: Tensor, cond: Tensor) -> Tensor:
        """Images (B, C, H, W) from noise z with the trained generator (for grids and evaluation)."""
        raise NotImplementedError

    def sampler(self, generator) -> SamplerSpec:
        """How the exported generator samples (written with the export; models/export.py)."""
        return SamplerSpec()

    def critic_loss(self, batch: Batch, **roles) -> LossOut:
        raise NotImplementedError
