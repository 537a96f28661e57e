"""Few-step samplers over any affine schedule: DDIM, LCM, TCD, Euler for flow, and the 1-step call.

DDIM: Song, Meng, Ermon, "Denoising Diffusion Implicit Models" (arXiv 2010.02502).
LCM: Luo et al., "Latent Consistency Models" (arXiv 2310.04378).
TCD: Zheng et al., "Trajectory Consistency Distillation" (arXiv 2402.19159).

Each sampler reproduces the diffusers scheduler of the same name step for step
(DDIMScheduler, LCMScheduler, TCDScheduler with clip_sample=False, no thresholding,
eps prediction, init_noise_sigma = 1), including where diffusers draws its noise: pass
the same seeded ``torch.Generator`` and the draws coincide. The samplers only see a
``Denoiser`` (``denoiser(x_t, t, cond, out=...)`` with ``.schedule``), so the network's
own prediction type never matters here.

Every step is one ``affine_jump`` of an (x0, eps) pair. Shapes: x, noise (B, ...); t a python
int (a grid index) or float (continuous time), one for the whole batch; alpha/sigma arguments
are floats, scalars or (B,) tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from hyperscale.diffusion.schedule import Prediction, RectifiedFlow, bcast, convert, is_index, to_eps_x0


class Spacing(str, Enum):
    """DDIM grid spacings, as ``timestep_spacing`` in diffusers (Lin et al. 2305.08891, Table 2)."""
    leading = "leading"
    trailing = "trailing"
    linspace = "linspace"


class PrevRule(str, Enum):
    """Where a DDIM step lands. ``stride``: t - T // n, as DDIMScheduler.step does for every
    spacing; ``grid``: the next grid entry (clean data after the last). They agree for
    "leading" and for "trailing" when n divides T; for "linspace" only ``grid`` lands on the grid."""
    stride = "stride"
    grid = "grid"


class NoiseInput(str, Enum):
    """How a 1-step generator feeds noise z in at timestep t. ``unit``: x_t = z (diffusers
    pipelines: Hyper-SDXL 1-step UNet at t = 800, DMD2 at t = 399). ``sigma``: x_t = sigma_t z,
    i.e. x~ = sigma~ z in VE coordinates (SIM / SiD, sigma~ = 2.5)."""
    unit = "unit"
    sigma = "sigma"


@dataclass(frozen=True)
class SamplerStep:
    """What a sampler hands its callback after each step: x the new sample (B, ...) and x0 the
    step's clean estimate (DDIM/TCD: predicted x_0; LCM: the boundary-conditioned ``denoised``)."""
    index: int
    t: int
    x: Tensor
    x0: Tensor


Callback = Callable[[SamplerStep], None]


def timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: Spacing | str = "leading",
              steps_offset: int = 0) -> Tensor:
    """Descending DDIM grid, shape (num_steps,), long; equal to DDIMScheduler.set_timesteps."""
    n, T, spacing = num_steps, num_train_timesteps, Spacing(spacing)
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {n}")
    if spacing is Spacing.linspace:
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing is Spacing.leading:
        ts = np.arange(n) * (T // n) + steps_offset
        ts = ts[::-1]
    else:  # numpy's float arange/round, so the grid equals diffusers' to the last index
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    return torch.from_numpy(ts.astype(np.int64).copy())


def lcm_timesteps(num_steps: int, original_inference_steps: int | None = 50,
                  num_train_timesteps: int = 1000) -> Tensor:
    """LCM/TCD grid, shape (num_steps,), long: n indices evenly spread over the descending
    distillation grid {k-1, 2k-1, ..., T-1} with k = T // original_inference_steps
    (LCMScheduler / TCDScheduler.set_timesteps(n) with that config value).
    ``None`` spreads them over all of {0, ..., T-1}, which is what TCDScheduler does when
    ``original_inference_steps`` is passed to set_timesteps explicitly."""
    T = num_train_timesteps
    if original_inference_steps is None:
        origin = np.arange(T)
    else:
        origin = np.arange(1, original_inference_steps + 1) * (T // original_inference_steps) - 1
    if not 1 <= num_steps <= len(origin):
        raise ValueError(f"num_steps must be in [1, {len(origin)}], got {num_steps}")
    origin = origin[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[idx].astype(np.int64).copy())


def _f64(v: Tensor | float) -> Tensor:
    return v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.float64)


def predict_x0(x_t: Tensor, eps: Tensor, alpha_t: Tensor | float, sigma_t: Tensor | float) -> Tensor:
    """x_0 from eps at x_t = alpha_t x_0 + sigma_t eps, shape of x_t."""
    # DDIM eq. 12, "predicted x_0": (x_t - sigma_t eps) / alpha_t
    return (x_t - bcast(_f64(sigma_t), x_t) * eps) / bcast(_f64(alpha_t), x_t)


def ddim_sigma(alpha_t: Tensor | float, sigma_t: Tensor | float, alpha_s: Tensor | float,
               sigma_s: Tensor | float, eta: float = 1.0) -> Tensor:
    """Noise scale of a stochastic DDIM step t -> s < t: eta times the std of the posterior
    q(x_s | x_t, x_0) of the affine path (eta = 1 is DDPM's posterior std)."""
    a_t, s_t, a_s, s_s = (_f64(v) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    if eta == 0:  # also keeps the deterministic inversion (s > t) free of sqrt(negative)
        return torch.zeros_like(a_s * a_t)
    # DDIM eq. 16 for any affine path: eta (sigma_s / sigma_t) sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2)
    return eta * s_s / s_t * (s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2).clamp(min=0).sqrt()


def affine_jump(x0: Tensor, eps: Tensor, alpha_s: Tensor | float, sigma_s: Tensor | float,
                noise_std: Tensor | float = 0.0, noise: Tensor | None = None) -> Tensor:
    """The point alpha_s x0 + sigma_s eps of the (x0, eps) pair's path at s: every sampler's step
    (DDIM, LCM, TCD, Euler for flow), TSCD's targets and the rollouts. With ``noise_std`` > 0
    part of the eps variance is fresh ``noise`` (shape of x0): DDIM eq. 12,
    x_s = alpha_s x0 + sqrt(sigma_s^2 - std^2) eps + std z."""
    a_s, s_s = _f64(alpha_s), _f64(sigma_s)
    if noise is None:
        return bcast(a_s, x0) * x0 + bcast(s_s, x0) * eps
    std = _f64(noise_std)
    keep = (s_s ** 2 - std ** 2).clamp(min=0).sqrt()
    return bcast(a_s, x0) * x0 + bcast(keep, x0) * eps + bcast(std, x0) * noise


def ddim_jump(x_t: Tensor, eps: Tensor, at: tuple, to: tuple) -> Tensor:
    """Deterministic DDIM move of x_t with its eps from ``at`` = (alpha_t, sigma_t) to ``to`` =
    (alpha_s, sigma_s) (s < t denoises, s > t inverts), shape of x_t.
    Exact when eps is the true noise: a_t x0 + s_t eps -> a_s x0 + s_s eps."""
    return affine_jump(predict_x0(x_t, eps, *at), eps, *to)


def renoise(x_s: Tensor, at: tuple, to: tuple, noise: Tensor) -> Tensor:
    """Forward diffusion of a point at ``at`` = (alpha_s, sigma_s) to the noisier ``to`` =
    (alpha_t, sigma_t): x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) z
    (the transition kernel of the affine path; TCD's re-noise, eq. 19, on a VP path)."""
    (a_s, s_s), (a_t, s_t) = (tuple(_f64(v) for v in p) for p in (at, to))
    r = a_t / a_s
    return bcast(r, x_s) * x_s + bcast((s_t ** 2 - r ** 2 * s_s ** 2).clamp(min=0).sqrt(), x_s) * noise


def clipped_pair(x_t: Tensor, eps: Tensor, alpha_t: Tensor | float, sigma_t: Tensor | float,
                 clip_x0: bool = False, use_clipped_model_output: bool = False) -> tuple[Tensor, Tensor]:
    """(x0, eps) for a DDIM step, as DDIMScheduler.step: x0 from eps, clamped to [-1, 1] with
    ``clip_x0``; ``use_clipped_model_output`` re-derives eps from the clamped x0 (diffusers'
    flag of that name; guided-diffusion's DDIM always does), so the pair stays consistent."""
    return clip_pair(x_t, predict_x0(x_t, eps, alpha_t, sigma_t), eps, alpha_t, sigma_t, clip_x0,
                     use_clipped_model_output)


def clip_pair(x_t: Tensor, x0: Tensor, eps: Tensor, alpha_t: Tensor | float, sigma_t: Tensor | float,
              clip_x0: bool = False, use_clipped_model_output: bool = False) -> tuple[Tensor, Tensor]:
    """``clipped_pair`` on an (x0, eps) pair already predicted (``predict_pair``)."""
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        if use_clipped_model_output:
            eps = convert(x0, x_t, _f64(alpha_t), _f64(sigma_t), Prediction.x0, Prediction.eps)
    return x0, eps


def ddim_step(x_t: Tensor, eps: Tensor, at: tuple, to: tuple, eta: float = 0.0, noise: Tensor | None = None,
              clip_x0: bool = False, use_clipped_model_output: bool = False) -> Tensor:
    """Stochastic DDIM step from ``at`` = (alpha_t, sigma_t) to ``to`` = (alpha_s, sigma_s); as
    DDIMScheduler.step (see ``clipped_pair``)."""
    if eta > 0 and noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    x0, eps = clipped_pair(x_t, eps, *at, clip_x0, use_clipped_model_output)
    if eta == 0:
        return affine_jump(x0, eps, *to)
    return affine_jump(x0, eps, *to, ddim_sigma(*at, *to, eta), noise)


def lcm_boundary(t: int, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[float, float]:
    """(c_skip, c_out) of the LCM consistency parameterisation at timestep t."""
    u = t * timestep_scaling
    # LCM eq. 9 with CM's c_skip = sigma_data^2 / (u^2 + sigma_data^2), c_out = u / sqrt(u^2 + sigma_data^2)
    return sigma_data ** 2 / (u ** 2 + sigma_data ** 2), u / math.sqrt(u ** 2 + sigma_data ** 2)


Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn(like: Tensor, generator: Generators) -> Tensor:
    """Noise shaped like ``like``. One generator draws the whole batch; a sequence holds one
    generator per sample, so each sample's noise is independent of what it is batched with."""
    if isinstance(generator, Sequence):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        return torch.cat([_randn(like[i:i + 1], g) for i, g in enumerate(generator)])
    # drawn on the generator's device, as diffusers' randn_tensor does, so seeds reproduce it
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _times(t, x: Tensor) -> Tensor:
    """A batch (B,) of one time: long for a grid index, float64 for continuous time."""
    dtype = torch.long if is_index(t) else torch.float64
    return torch.full((x.shape[0],), t if is_index(t) else float(t), dtype=dtype, device=x.device)


def _eps(denoiser, x: Tensor, t, cond) -> Tensor:
    return denoiser(x, _times(t, x), cond, out=Prediction.eps)


def predict_pair(denoiser, x: Tensor, t, cond) -> tuple[Tensor, Tensor]:
    """(x0, eps) of the denoiser at (x, t) from one call in its native parameterisation, so a
    flow model at sigma = 1 (alpha = 0) never divides by alpha. t: one time for the batch, or
    per-sample times (B,). For an eps-native denoiser this is exactly eps and DDIM's x0 (a
    denoiser that declares no ``prediction_type`` is asked for eps)."""
    native = getattr(denoiser, "prediction_type", Prediction.eps)
    a, s = denoiser.schedule.alpha_sigma(t)
    tb = t if isinstance(t, Tensor) and t.ndim == 1 else _times(t, x)
    pred = denoiser(x, tb, cond, out=native)
    eps, x0 = to_eps_x0(pred, x, bcast(a, x), bcast(s, x), native)
    return (predict_x0(x, eps, a, s) if x0 is None else x0), eps


def _alpha_sigma(sched, t, final_alpha_cumprod: float | None = None) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) at a grid index or time; index -1 is the clean end, or abar
    ``final_alpha_cumprod`` there (DDIMScheduler(set_alpha_to_one=False))."""
    if final_alpha_cumprod is not None and is_index(t) and int(t) < 0:
        final = torch.tensor(float(final_alpha_cumprod), dtype=torch.float64)
        return final.sqrt(), (1 - final).sqrt()
    return sched.alpha_sigma(t)


def ddim_walk(denoiser, x: Tensor, cond, moves: Sequence[tuple], eta: float = 0.0, clip_x0: bool = False,
              generator: Generators = None, final_alpha_cumprod: float | None = None,
              callback: Callback | None = None, use_clipped_model_output: bool = False) -> Tensor:
    """DDIM steps (t -> s) for each pair of ``moves`` (grid indices or times; -1 is clean data),
    from x (B, ...). No ``no_grad`` here: the samplers add it, the rollouts choose."""
    sched = denoiser.schedule
    for i, (t, s) in enumerate(moves):
        at, to = _alpha_sigma(sched, t), _alpha_sigma(sched, s, final_alpha_cumprod)
        # the native pair: also defined where alpha = 0 (a flow model at t = 1)
        x0, eps = clip_pair(x, *predict_pair(denoiser, x, t, cond), *at, clip_x0, use_clipped_model_output)
        if eta > 0:
            x = affine_jump(x0, eps, *to, ddim_sigma(*at, *to, eta), _randn(x, generator))
        else:
            x = affine_jump(x0, eps, *to)
        if callback is not None:
            callback(SamplerStep(i, t, x, x0))
    return x


@torch.no_grad()
def sample_ddim(denoiser, noise: Tensor, cond, num_steps: int, spacing: Spacing | str = "leading",
                eta: float = 0.0, clip_x0: bool = False, generator: Generators = None,
                final_alpha_cumprod: float | None = None, steps_offset: int = 0,
                prev: PrevRule | str = "stride", callback: Callback | None = None,
                use_clipped_model_output: bool = False) -> Tensor:
    """DDIM from x_T = noise (B, ...) to x_0 (B, ...).

    ``final_alpha_cumprod``: abar used once a step lands below t = 0; None means 1.0
    (DDIMScheduler(set_alpha_to_one=True)); pass ``schedule.alphas_cumprod[0]`` for False.
    Noise for eta > 0 is drawn at every step, as diffusers does."""
    T = denoiser.schedule.num_train_timesteps
    ts, prev = timesteps(num_steps, T, spacing, steps_offset).tolist(), PrevRule(prev)
    if prev is PrevRule.stride:
        moves = [(t, t - T // num_steps) for t in ts]
    else:
        moves = list(zip(ts, ts[1:] + [-1]))
    return ddim_walk(denoiser, noise, cond, moves, eta, clip_x0, generator,
                     1.0 if final_alpha_cumprod is None else final_alpha_cumprod, callback,
                     use_clipped_model_output)


@torch.no_grad()
def sample_lcm(denoiser, noise: Tensor, cond, num_steps: int, original_inference_steps: int = 50,
               generator: Generators = None, timesteps: list[int] | Tensor | None = None,
               timestep_scaling: float = 10.0, sigma_data: float = 0.5,
               callback: Callback | None = None) -> Tensor:
    """LCM multistep sampling from x_T = noise (B, ...) to x_0 (B, ...), as LCMScheduler.

    Each step: x0 from eps, denoised = c_skip x_t + c_out x0, then (except at the last step)
    re-noise to the next timestep with fresh noise. ``timesteps`` (descending) overrides the grid."""
    sched = denoiser.schedule
    ts = _grid(timesteps, num_steps, original_inference_steps, sched.num_train_timesteps)
    x = noise
    for i, t in enumerate(ts):
        eps = _eps(denoiser, x, t, cond)
        c_skip, c_out = lcm_boundary(t, timestep_scaling, sigma_data)
        denoised = c_out * predict_x0(x, eps, *sched.alpha_sigma(t)) + c_skip * x
        if i + 1 < len(ts):
            # LCM Alg. 3 (multistep): x_{t'} = alpha_t' denoised + sigma_t' z
            x = affine_jump(denoised, _randn(x, generator), *sched.alpha_sigma(ts[i + 1]))
        else:
            x = denoised
        if callback is not None:
            callback(SamplerStep(i, t, x, denoised))
    return x


@torch.no_grad()
def sample_tcd(denoiser, noise: Tensor, cond, num_steps: int, eta: float = 0.3,
               original_inference_steps: int | None = 50, generator: Generators = None,
               timesteps: list[int] | Tensor | None = None, callback: Callback | None = None) -> Tensor:
    """TCD (gamma = eta) from x_T = noise (B, ...), as TCDScheduler (on a rectified-flow schedule:
    ``_tcd_flow``, over the Euler sampler's times).

    Step t -> t_prev: DDIM jump to s = floor((1 - eta) t_prev), then, when eta > 0 and not the
    last step, re-noise s -> t_prev with fresh noise. The last step has t_prev = 0, so, as in
    diffusers, the result is x at timestep 0 (abar_0 < 1), not a jump to abar = 1."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    sched = denoiser.schedule
    if isinstance(sched, RectifiedFlow):
        return _tcd_flow(denoiser, noise, cond, num_steps, eta, generator, callback)
    ts = _grid(timesteps, num_steps, original_inference_steps, sched.num_train_timesteps)
    x = noise
    for i, t in enumerate(ts):
        last = i + 1 == len(ts)
        t_prev = 0 if last else ts[i + 1]
        # floor in float32, exactly as TCDScheduler (long tensor times a python float)
        s = int(torch.floor((1 - eta) * torch.tensor(t_prev, dtype=torch.float32)))
        eps = _eps(denoiser, x, t, cond)
        x0 = predict_x0(x, eps, *sched.alpha_sigma(t))
        x = affine_jump(x0, eps, *sched.alpha_sigma(s))
        if eta > 0 and not last:  # TCD eq. 19 (SSS): back up to t_prev with fresh noise
            x = renoise(x, sched.alpha_sigma(s), sched.alpha_sigma(t_prev), _randn(x, generator))
        if callback is not None:
            callback(SamplerStep(i, t, x, x0))
    return x


def _tcd_flow(denoiser, noise: Tensor, cond, num_steps: int, eta: float, generator: Generators,
                    callback: Callback | None) -> Tensor:
    """TCD on a continuous (rectified-flow) schedule, over the Euler sampler's times: step t -> t_prev
    jumps with the model's (x0, eps) pair to s = (1 - eta) t_prev, then re-noises s -> t_prev with
    fresh noise (not on the last step). eta = 0 is the Euler sampler; eta = 1 is
    FlowMatchEulerDiscreteScheduler(stochastic_sampling=True): x0, then fresh noise at sigma_next."""
    sched = denoiser.schedule
    ts = flow_times(num_steps, sched)
    x = noise
    for i, t in enumerate(ts):
        last = i + 1 == len(ts)
        t_prev = 0.0 if last else float(ts[i + 1])
        s = (1 - eta) * t_prev
        x0, eps = predict_pair(denoiser, x, t, cond)
        x = affine_jump(x0, eps, *sched.alpha_sigma(s))
        if eta > 0 and not last:
            x = renoise(x, sched.alpha_sigma(s), sched.alpha_sigma(t_prev), _randn(x, generator))
        if callback is not None:
            callback(SamplerStep(i, t, x, x0))
    return x


def flow_times(num_steps: int, schedule) -> list[float]:
    """Descending times of an n-step Euler sampler on a rectified-flow schedule, by its
    ``spacing``: "linspace" as FlowMatchEulerDiscreteScheduler.set_timesteps(n) (static shift):
    unshifted times evenly spaced from 1 to the shifted sigma of the first grid step (diffusers
    shifts that end twice), SD3's pipeline; "trailing": 1, (n-1)/n, ..., 1/n, the sigmas FLUX's
    pipeline passes (then shifted like every time)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if getattr(schedule, "spacing", "linspace") == "trailing":
        return np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
    sigma_min = float(schedule.alpha_sigma(0)[1])
    return np.linspace(1.0, sigma_min, num_steps).tolist()


@torch.no_grad()
def sample_euler(denoiser, noise: Tensor, cond, num_steps: int, times: Sequence[float] | None = None,
                 callback: Callback | None = None) -> Tensor:
    """Euler on the probability-flow ODE of a (rectified-flow) schedule from x_1 = noise (B, ...)
    to clean data, as FlowMatchEulerDiscreteScheduler: each step moves the model's (x0, eps)
    pair to the next time, which for a flow path is x + (sigma_next - sigma) v."""
    sched = denoiser.schedule
    ts = list(times) if times is not None else flow_times(num_steps, sched)
    x = noise
    for i, t in enumerate(ts):
        x0, eps = predict_pair(denoiser, x, t, cond)
        nxt = ts[i + 1] if i + 1 < len(ts) else 0.0
        x = affine_jump(x0, eps, *sched.alpha_sigma(float(nxt)))
        if callback is not None:
            callback(SamplerStep(i, t, x, x0))
    return x


def _grid(custom, num_steps: int, original_inference_steps: int | None, T: int) -> list[int]:
    if custom is None:
        return lcm_timesteps(num_steps, original_inference_steps, T).tolist()
    custom = [int(t) for t in custom]
    if any(b >= a for a, b in zip(custom, custom[1:])) or custom[0] >= T:
        raise ValueError(f"timesteps must be descending and below {T}, got {custom}")
    return custom


def one_step(denoiser, noise: Tensor, cond, t, noise_input: NoiseInput | str = "unit") -> Tensor:
    """x0 prediction (B, ...) from pure noise (B, ...) at a fixed time t (grid index or
    continuous); the forward pass of a 1-step generator, so gradients flow (no no_grad here)."""
    tb = _times(t.item() if isinstance(t, Tensor) else t, noise)
    x_t = noise
    if NoiseInput(noise_input) is NoiseInput.sigma:
        x_t = bcast(denoiser.schedule.alpha_sigma(tb)[1], noise) * noise
    return denoiser(x_t, tb, cond, out=Prediction.x0)
