"""Schedules, prediction-type conversions and samplers (pure tensor math)."""
from hyperscale.diffusion.sampling import (NoiseInput, PrevRule, SamplerStep, Spacing, ddim_jump, ddim_sigma,
                                           ddim_step, ddim_update, lcm_boundary, lcm_timesteps, one_step,
                                           predict_x0, sample_ddim, sample_lcm, sample_tcd, timesteps)
from hyperscale.diffusion.schedule import (NoiseSchedule, Prediction, ScheduleKind, bcast, cfg_combine, convert,
                                           make_betas)

__all__ = ["NoiseInput", "NoiseSchedule", "Prediction", "PrevRule", "SamplerStep", "ScheduleKind", "Spacing",
           "bcast", "cfg_combine", "convert", "ddim_jump", "ddim_sigma", "ddim_step", "ddim_update",
           "lcm_boundary", "lcm_timesteps", "make_betas", "one_step", "predict_x0", "sample_ddim", "sample_lcm",
           "sample_tcd", "timesteps"]
