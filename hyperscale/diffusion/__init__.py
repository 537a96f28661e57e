"""Schedules, prediction-type conversions, time distributions and samplers (pure tensor math)."""
from hyperscale.diffusion.sampling import (NoiseInput, PrevRule, SamplerStep, Spacing, affine_jump, ddim_jump,
                                           ddim_sigma, ddim_step, ddim_walk, flow_times, lcm_boundary,
                                           lcm_timesteps, one_step, predict_pair, predict_x0, renoise, sample_ddim,
                                           sample_euler, sample_lcm, sample_tcd, timesteps)
from hyperscale.diffusion.schedule import (DiscreteVP, Prediction, RectifiedFlow, Schedule, ScheduleKind, bcast,
                                           cfg_combine, convert, make_betas, schedule_from_config)
from hyperscale.diffusion.timedist import TimeDist, time_dist

__all__ = ["DiscreteVP", "NoiseInput", "Prediction", "PrevRule", "RectifiedFlow", "SamplerStep", "Schedule",
           "ScheduleKind", "Spacing", "TimeDist", "affine_jump", "bcast", "cfg_combine", "convert", "ddim_jump",
           "ddim_sigma", "ddim_step", "ddim_walk", "flow_times", "lcm_boundary", "lcm_timesteps", "make_betas",
           "one_step", "predict_pair", "predict_x0", "renoise", "sample_ddim", "sample_euler", "sample_lcm",
           "sample_tcd", "schedule_from_config", "time_dist", "timesteps"]
