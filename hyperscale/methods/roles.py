"""Build a method's roles from its declaration (``Method.roles``): the one builder the trainer
and the method tests share."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from hyperscale.methods.base import Method, RoleSpec
from hyperscale.models.ema import EMA


@dataclass
class Roles:
    """``trainable``: generator first, then the critic; ``frozen``: every frozen role, EMA copies
    included; ``trackers``: the EMA roles' trackers with the role each one follows."""
    trainable: dict[str, nn.Module] = field(default_factory=dict)
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    trackers: dict[str, tuple[EMA, str]] = field(default_factory=dict)
    specs: dict[str, RoleSpec] = field(default_factory=dict)


def build_roles(method: Method, *, teacher: Callable[[], nn.Module] | None, fresh: Callable[[], nn.Module],
                rewards: Callable[[tuple], nn.Module],
                prepare: Callable[[str, nn.Module], nn.Module] = lambda _n, m: m) -> Roles:
    """Every role of ``method``. ``teacher``: loads the frozen teacher (called once, when a role
    needs it); ``fresh``: a new model of the configured architecture; ``rewards``: reward models
    from specs; ``prepare(name, module)``: applied to each trainable role as soon as it is built
    (device moves, broadcasts), before EMA copies of it are taken."""
    specs = method.checked_roles()
    out = Roles(specs={s.name: s for s in specs})
    loaded: list[nn.Module] = []

    def the_teacher() -> nn.Module:
        if not loaded:
            if teacher is None:
                raise ValueError(f"method '{method.config.name}' needs a teacher (model.pretrained_teacher_model)")
            loaded.append(teacher().eval().requires_grad_(False))
        return loaded[0]

    def make(spec: RoleSpec) -> nn.Module:
        if spec.init == "copy_of_teacher":
            return copy.deepcopy(the_teacher())
        if spec.init == "fresh":
            return fresh()
        return spec.build(the_teacher())  # custom

    for kind in ("generator", "critic"):
        for spec in (s for s in specs if s.kind == kind):
            out.trainable[spec.name] = prepare(spec.name, make(spec).train())
    for spec in (s for s in specs if s.kind == "frozen"):
        if spec.init == "teacher":
            module = the_teacher()
        elif spec.init == "ema":
            if spec.source not in out.trainable:
                raise ValueError(f"role '{spec.name}' follows '{spec.source}', which is not a trained role")
            tracker = EMA(out.trainable[spec.source], spec.decay, warmup=False)
            out.trackers[spec.name] = (tracker, spec.source)
            module = tracker.model
        elif spec.init == "reward":
            module = rewards(spec.rewards)
        else:
            module = make(spec)
        out.frozen[spec.name] = module.eval().requires_grad_(False)
    return out
