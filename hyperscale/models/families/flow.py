"""Shared machinery of the rectified-flow text-to-image families (SD3, FLUX): the schedule a
FlowMatchEulerDiscreteScheduler config describes and the scheduler an export ships.

Schedule. The network predicts the flow v = eps - x0 (``Prediction.flow``;
FlowMatchEulerDiscreteScheduler.step moves x by (sigma_next - sigma) v) on the path
x_sigma = (1 - sigma) x0 + sigma eps, fed 1000 sigma as its timestep (``RectifiedFlow``).
The shift is the config's static ``shift``, or with ``use_dynamic_shifting`` the resolution
dependent one: at a fixed latent size the pipelines' mu(image_seq_len) is a static shift exp(mu)
(exponential time shift) or mu (linear), so training and the export's sampler agree at the
resolution the pipeline generates at by default (``latent_size``).

Exports. A flow pipeline reproduces two of our samplers with its own scheduler, unchanged:
- a 1-step call at t = 1 (x_t = z; SIM with ``init_sigma: .inf``, DMD at ``generator_timestep``
  T - 1, TSCD at one segment): the pipeline's one Euler step from sigma 1 to 0 is x0 = z - v;
- an n-step Euler sampler (``sampling.sample_euler``) on the family's grid (``spacing``).
A 1-step call at t < 1 cannot be reproduced by a plain pipeline call (its first sigma is always
1), so such exports are refused with the fix.
"""
from __future__ import annotations

import math
from typing import ClassVar

from torch import nn

from hyperscale.diffusion.schedule import Prediction, RectifiedFlow, Schedule

# FlowMatchEulerDiscreteScheduler options our Euler sampler does not follow
UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
               "use_beta_sigmas", "stochastic_sampling")


def dynamic_shift(config: dict, image_seq_len: int) -> float:
    """The static shift equal to the pipelines' resolution-dependent one at ``image_seq_len``:
    mu interpolates linearly from base_shift at base_image_seq_len to max_shift at max_image_seq_len."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = base + (top - base) * (image_seq_len - lo) / (hi - lo)
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


class FlowFamily:
    """Mixin for a ``TextToImageFamily`` on rectified flow; the family sets ``spacing`` (its
    pipeline's n-step grid, ``RectifiedFlow``) and ``image_seq_len``."""
    spacing: ClassVar[str] = "linspace"

    def image_seq_len(self, net: nn.Module, latent_size: int) -> int:
        """The number of image tokens the network sees at latent side ``latent_size``."""
        raise NotImplementedError

    def prediction_of(self, scheduler_config: dict) -> Prediction:
        return Prediction.flow

    def schedule_of(self, scheduler_config: dict, net: nn.Module, latent_size: int) -> Schedule:
        cls = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if cls != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"family {self.name}: the pipeline's scheduler is a {cls}; rectified-flow training "
                             f"reads a FlowMatchEulerDiscreteScheduler config (replace scheduler/ with one)")
        bad = [k for k in UNSUPPORTED if scheduler_config.get(k)]
        if bad:
            raise ValueError(f"family {self.name}: scheduler options {bad} are not supported (our Euler sampler "
                             f"and the exported scheduler would disagree); turn them off in scheduler_config.json")
        if scheduler_config.get("use_dynamic_shifting"):
            shift = dynamic_shift(scheduler_config, self.image_seq_len(net, latent_size))
        else:
            shift = float(scheduler_config.get("shift", 1.0))
        return RectifiedFlow(shift, int(scheduler_config.get("num_train_timesteps", 1000)), self.spacing)

    def export_scheduler(self, denoiser, extra: dict):
        """The teacher's FlowMatchEulerDiscreteScheduler, after checking it reproduces the sampler
        (module docstring); nothing declared: the teacher's scheduler as well."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from hyperscale.models.export import SamplerSpec

        spec = SamplerSpec.from_extra(extra)
        sched = denoiser.schedule
        if spec.is_one_step_generator:
            t = float(sched.time(spec.one_step.timestep))
            if abs(t - 1.0) > 1e-9:
                raise ValueError(f"family {self.name}: a 1-step generator at t = {t:.4g} < 1 cannot be exported as a "
                                 f"pipeline (its scheduler always starts at sigma 1); train it at t = 1 "
                                 f"(SIM: method.init_sigma=.inf; DMD: method.generator_timestep=null)")
        elif spec.few_step is not None and spec.few_step.name != "euler":
            raise ValueError(f"family {self.name}: a {spec.few_step.name} sampler cannot be exported for a flow model; "
                             f"flow families sample with Euler (FewStep('euler'), sampling.sample_euler)")
        elif spec.few_step is not None and spec.few_step.spacing != sched.spacing:
            raise ValueError(f"family {self.name}: the Euler sampler was declared with spacing "
                             f"{spec.few_step.spacing!r} but the pipeline's grid is {sched.spacing!r}; declare "
                             f"FewStep('euler', n, schedule.spacing)")
        return FlowMatchEulerDiscreteScheduler.from_config(denoiser.frontend.pipe.scheduler.config)
