"""How an export samples: the typed ``SamplerSpec`` every method declares (``Method.sampler``)
and every reader uses (the trainer's export, the Hyper-SD pipeline's unified export, the image
generator behind Serve, the quality benchmark).

On disk it is the ``extra`` of the export's metadata, in the keys shipped exports already carry:
``generator`` ({timestep, noise_input}: the 1-step call), ``sampler`` ({name, spacing, num_steps,
guidance_scale}: the few-step sampler it was trained for), ``multi_step`` (true: one set of
weights for 1 to 8 steps, the Hyper-SD unified LoRA) and method notes (e.g. ``tscd``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from hyperscale.diffusion.sampling import NoiseInput


@dataclass(frozen=True)
class OneStepCall:
    """One network call on noise: at ``timestep`` (a grid index, or a continuous time on a
    continuous schedule), with x_t = z (``unit``) or sigma_t z."""
    timestep: int | float
    noise_input: NoiseInput = NoiseInput.unit

    def to_json(self) -> dict:
        return {"timestep": self.timestep, "noise_input": NoiseInput(self.noise_input).value}


@dataclass(frozen=True)
class FewStep:
    """The few-step sampler a method trained the weights for ("euler": flow families' sampler,
    ``sampling.sample_euler``, whose grid is the schedule's ``spacing``)."""
    name: Literal["ddim", "tcd", "euler"] = "ddim"
    num_steps: int = 4
    spacing: str = "trailing"
    guidance_scale: float = 1.0

    def to_json(self) -> dict:
        return {"name": self.name, "spacing": self.spacing, "num_steps": int(self.num_steps),
                "guidance_scale": float(self.guidance_scale)}


@dataclass(frozen=True)
class SamplerSpec:
    one_step: OneStepCall | None = None
    few_step: FewStep | None = None
    multi_step: bool = False
    notes: dict = field(default_factory=dict)

    @property
    def is_one_step_generator(self) -> bool:
        """Weights served as a 1-step generator (SIM, DMD, TSCD at k = 1), not a multi-step model."""
        return self.one_step is not None and not self.multi_step

    def one_step_at(self, steps: int, sampler: str) -> OneStepCall | None:
        """The one rule for every sampler of a multi-step export (Serve, the benchmark): 1 step with
        TCD goes through the export's own 1-step call (the unified LoRA's DMD phase's, as Hyper-SD's
        1-step sampling uses its own timestep rather than the trailing T - 1); DDIM keeps its
        trailing grid, every other step count the sampler's. None: the sampler's own grid."""
        if self.multi_step and self.one_step is not None and steps == 1 and sampler == "tcd":
            return self.one_step
        return None

    def unified(self) -> "SamplerSpec":
        """The same weights declared as one model for 1 to 8 steps (the Hyper-SD pipeline's export)."""
        return replace(self, multi_step=True)

    def to_extra(self) -> dict:
        out = dict(self.notes)
        if self.few_step is not None:
            out["sampler"] = self.few_step.to_json()
        if self.one_step is not None:
            out["generator"] = self.one_step.to_json()
        if self.multi_step:
            out["multi_step"] = True
        return out

    @classmethod
    def from_extra(cls, extra: dict) -> "SamplerSpec":
        g, s = extra.get("generator"), extra.get("sampler")
        return cls(one_step=OneStepCall(g["timestep"], NoiseInput(g["noise_input"])) if g else None,
                   few_step=FewStep(s["name"], int(s["num_steps"]), s.get("spacing", "trailing"),
                                    float(s.get("guidance_scale", 1.0))) if s else None,
                   multi_step=bool(extra.get("multi_step")),
                   notes={k: v for k, v in extra.items() if k not in ("generator", "sampler", "multi_step")})
