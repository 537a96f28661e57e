"""Trajectory segments for TSCD (Hyper-SD, docs/algorithms.md §2.2) and plain consistency distillation.

Pure integer/tensor math on the DDPM grid {0, ..., T-1}; timestep -1 means clean data
(alpha = 1, sigma = 0 on every schedule). Nothing here calls a network: the caller evaluates the
teacher / student / target and uses these helpers for *where* each one is evaluated and
*where* its prediction is moved to.

Segments. [0, T) is split into k segments. Two edge rules, an explicit choice because the
paper's exact boundary math is [P] (§2.8 item 4):

- ``trailing`` (default): lower edges e_j = floor(j T / k) - 1, so e_0 = -1 (clean data);
  segment j holds e_j < t <= e_{j+1}. The segment tops e_{j+1} = floor((j+1) T / k) - 1 are
  exactly the timesteps of k-step DDIM with "trailing" spacing (999, 749, 499, 249 for
  k = 4), the sampler the N-step Hyper-SD LoRAs use [V] (§2.5), and each step of that
  sampler lands on the next lower edge, i.e. where training moved the prediction to.
- ``floor``: the brief's t_b = floor(t / floor(T/k)) floor(T/k) generalised to
  e_j = floor(j T / k): segment j holds e_j <= t < e_{j+1}, and the bottom edge is timestep
  0 (LCM's "boundary at 0": its DDIM solver clamps t_{n-1} = max(t_n - k, 0)).

With k = 1 the only edge is the bottom one, so every target is the clean end (trailing) or
timestep 0 (floor): plain consistency distillation.

Skipping-step grid (LCM's DDIM solver): ``num_ddim_timesteps`` N gives the skip
s = T // N and the grid t_n = (n + 1) s - 1, n = 0..N-1 ({19, 39, ..., 999} for N = 50).
The teacher moves t_n -> t_{n-1} = t_n - s, clamped to the segment's lower edge so that
neither the teacher step nor any target ever leaves the segment. Training timesteps equal to
their own lower edge (possible under ``floor``) are never drawn: nothing is left to learn there.

Consistency targets (the TCD/PCM parameterisation, §2.2 [R]): a prediction at t is "moved"
to t_end <= t by a deterministic DDIM jump with its own eps; t_end is the segment's lower
edge (``edge``, PCM / Hyper-SD's figure) or uniform on the integers in [e, t_{n-1}]
(``random``, the CTM-style soft target of §2.2 [P]). At t_end == t the move is the identity
(the boundary condition f(x, t, t) = x), which ``move`` returns exactly.

Rectified flow (SD3, FLUX). The same segments over continuous time (``flow_segment_edges``):
the segment tops are the times of the student's k-step Euler sampler on the schedule's own grid
(``sampling.flow_times``; 1, (k-1)/k, ..., 1/k for FLUX's trailing grid), the bottom edge is
t = 0 (clean data), and the teacher's step is its Euler step, the move of its (x0, eps) pair
(``move_pair``; a DDIM jump is the same move written with eps). Times are float64 tensors; the
skipping-step grid is the integer one at t = (i + 1) / T, the teacher steps s / T. Only the
``trailing`` edge rule exists there.

Shapes: t and friends are (B,) long tensors (float64 times on flow); x is (B, ...).
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from dataclasses import dataclass

from hyperscale.diffusion.sampling import affine_jump, flow_times, predict_x0
from hyperscale.diffusion.sampling import renoise as forward_kernel
from hyperscale.diffusion.schedule import RectifiedFlow, Schedule


class EdgeRule(str, Enum):
    trailing = "trailing"
    floor = "floor"


class TargetRule(str, Enum):
    edge = "edge"
    random = "random"


class TimestepRule(str, Enum):
    grid = "grid"          # t_n on the skipping-step grid (LCM)
    uniform = "uniform"    # any integer timestep (also trains the k-step trailing inference timesteps)


def _check(k: int, T: int) -> None:
    if not 1 <= k <= T:
        raise ValueError(f"segments must be in [1, {T}], got {k}")


def segment_edges(k: int, num_train_timesteps: int = 1000, rule: EdgeRule | str = "trailing") -> Tensor:
    """The k + 1 edges, ascending, long: lower edges e_0..e_{k-1}, then the top bound e_k.

    trailing: e_j = floor(j T / k) - 1 (e_0 = -1 clean, e_k = T - 1, segment j = (e_j, e_{j+1}]);
    floor: e_j = floor(j T / k) (e_0 = 0, e_k = T, segment j = [e_j, e_{j+1}))."""
    T = num_train_timesteps
    _check(k, T)
    e = (torch.arange(k + 1, dtype=torch.long) * T) // k
    return e - 1 if EdgeRule(rule) is EdgeRule.trailing else e


def segment_index(t: Tensor, k: int, num_train_timesteps: int = 1000,
                  rule: EdgeRule | str = "trailing") -> Tensor:
    """Index j in [0, k) of the segment holding each timestep t in [0, T), shape of t."""
    T = num_train_timesteps
    _check(k, T)
    t = torch.as_tensor(t).long()
    if (t < 0).any() or (t >= T).any():
        raise ValueError(f"timesteps must lie in [0, {T})")
    edges = segment_edges(k, T, rule).to(t.device)
    if EdgeRule(rule) is EdgeRule.trailing:
        return _trailing_index(edges, t)
    # segment j = [e_j, e_{j+1}): the number of lower edges e_1..e_{k-1} at or below t
    return torch.searchsorted(edges[1:-1], t, right=True)


def _trailing_index(edges: Tensor, t: Tensor) -> Tensor:
    """Segment j = (e_j, e_{j+1}] of each t: the number of tops e_1..e_k strictly below t."""
    return torch.searchsorted(edges[1:], t, right=False)


def segment_lower_edge(t: Tensor, k: int, num_train_timesteps: int = 1000,
                       rule: EdgeRule | str = "trailing") -> Tensor:
    """The lower edge e_j of each timestep's segment (-1 = clean data under ``trailing``)."""
    edges = segment_edges(k, num_train_timesteps, rule).to(torch.as_tensor(t).device)
    return edges[segment_index(t, k, num_train_timesteps, rule)]


def segment_top(t: Tensor, k: int, num_train_timesteps: int = 1000,
                rule: EdgeRule | str = "trailing") -> Tensor:
    """The highest timestep inside each timestep's segment (e_{j+1}, or e_{j+1} - 1 under ``floor``)."""
    edges = segment_edges(k, num_train_timesteps, rule).to(torch.as_tensor(t).device)
    top = edges[segment_index(t, k, num_train_timesteps, rule) + 1]
    return top if EdgeRule(rule) is EdgeRule.trailing else top - 1


def skip_size(num_ddim_timesteps: int, num_train_timesteps: int = 1000) -> int:
    """The teacher's step size s = T // N (LCM's k: 20 for N = 50, 25 for N = 40)."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}")
    return num_train_timesteps // num_ddim_timesteps


def skip_grid(num_ddim_timesteps: int, num_train_timesteps: int = 1000) -> Tensor:
    """Ascending skipping-step grid t_n = (n + 1) s - 1, n = 0..N-1, long (N,) (LCM's DDIM solver)."""
    s = skip_size(num_ddim_timesteps, num_train_timesteps)
    return (torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * s) - 1


def trainable_timesteps(k: int, num_train_timesteps: int = 1000, rule: EdgeRule | str = "trailing",
                        timesteps: TimestepRule | str = "grid", num_ddim_timesteps: int = 50) -> Tensor:
    """Every timestep TSCD may draw as t_n (ascending, long): the grid (or all of [0, T)) minus
    the timesteps that sit on their own segment's lower edge."""
    T = num_train_timesteps
    cand = (skip_grid(num_ddim_timesteps, T) if TimestepRule(timesteps) is TimestepRule.grid
            else torch.arange(T, dtype=torch.long))
    keep = cand > segment_lower_edge(cand, k, T, rule)
    if not keep.any():
        raise ValueError(f"no trainable timestep for k = {k} with this grid")
    return cand[keep]


def teacher_prev(t: Tensor, skip: int, lower_edge: Tensor) -> Tensor:
    """t_{n-1} = max(t_n - s, e): the teacher's DDIM step never leaves the segment."""
    return torch.maximum(t - skip, lower_edge)


def target_time(t_prev: Tensor, lower_edge: Tensor, rule: TargetRule | str = "edge",
                generator: torch.Generator | None = None) -> Tensor:
    """t_end per sample: the lower edge, or uniform on the integers of [e, t_{n-1}] (on
    [e, t_{n-1}] for continuous times)."""
    if TargetRule(rule) is TargetRule.edge:
        return lower_edge.clone()
    continuous = t_prev.is_floating_point()
    span = (t_prev - lower_edge + (0 if continuous else 1)).to(torch.float64)
    u = torch.rand(t_prev.shape, generator=generator, dtype=torch.float64,
                   device=t_prev.device if generator is None else generator.device).to(t_prev.device)
    if continuous:
        return lower_edge + u * span
    return lower_edge + torch.clamp((u * span).floor().long(), max=(t_prev - lower_edge))


# ---------------------------------------------------------------- one schedule's segments

def flow_segment_edges(k: int, schedule: RectifiedFlow) -> Tensor:
    """The k + 1 edges (ascending, float64 times) of k segments on a flow schedule: 0, then the
    k-step Euler sampler's times from the lowest to t = 1 (module docstring)."""
    _check(k, schedule.num_train_timesteps)
    return torch.tensor([0.0] + flow_times(k, schedule)[::-1], dtype=torch.float64)


@dataclass(frozen=True)
class Segments:
    """The k segments of one schedule's time axis (``segments_of``): where TSCD draws t_n, how far
    the teacher steps and each time's segment. Integer grid indices on a discrete schedule, float64
    times on rectified flow."""
    k: int
    T: int
    rule: EdgeRule
    allowed: Tensor  # every t_n that may be drawn, ascending
    skip: int | float  # the teacher's step
    edges: Tensor | None = None  # flow: ``flow_segment_edges``; None: the integer rules above

    def lower_edge(self, t: Tensor) -> Tensor:
        if self.edges is None:
            return segment_lower_edge(t, self.k, self.T, self.rule)
        edges = self.edges.to(t.device)
        return edges[_trailing_index(edges, t)]

    def top(self, t: Tensor) -> Tensor:
        if self.edges is None:
            return segment_top(t, self.k, self.T, self.rule)
        edges = self.edges.to(t.device)
        return edges[_trailing_index(edges, t) + 1]


def segments_of(schedule: Schedule, k: int, rule: EdgeRule | str = "trailing",
                timesteps: TimestepRule | str = "grid", num_ddim_timesteps: int = 50) -> Segments:
    """k segments of ``schedule``: on the DDPM grid (the functions above), or over continuous time
    on rectified flow (``flow_segment_edges``; the same candidate grid, as times)."""
    T, rule = schedule.num_train_timesteps, EdgeRule(rule)
    if not isinstance(schedule, RectifiedFlow):
        return Segments(k, T, rule, trainable_timesteps(k, T, rule, timesteps, num_ddim_timesteps),
                        skip_size(num_ddim_timesteps, T))
    if rule is not EdgeRule.trailing:
        raise ValueError(f"edge rule {rule.value!r} is defined on the DDPM grid only; on rectified flow the "
                         f"segments end at the Euler sampler's times (method.edges=trailing)")
    edges = flow_segment_edges(k, schedule)
    cand = schedule.time(skip_grid(num_ddim_timesteps, T) if TimestepRule(timesteps) is TimestepRule.grid
                         else torch.arange(T, dtype=torch.long))
    keep = cand > edges[_trailing_index(edges, cand)]
    if not keep.any():
        raise ValueError(f"no trainable time for k = {k} with this grid")
    return Segments(k, T, rule, cand[keep], skip_size(num_ddim_timesteps, T) / T, edges)


def move(schedule: Schedule, x_t: Tensor, eps: Tensor, t: Tensor, t_end: Tensor) -> Tensor:
    """DDIM jump of the point x_t (B, ...) with its eps prediction from t to t_end <= t
    (f(x_t, t, t_end), the TCD/PCM consistency function); exactly x_t where t_end == t."""
    at = tuple(v.to(x_t.device) for v in schedule.alpha_sigma(t))
    return move_pair(schedule, x_t, predict_x0(x_t, eps, *at), eps, t, t_end)


def move_pair(schedule: Schedule, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor, t_end: Tensor) -> Tensor:
    """``move`` with the prediction as an (x0, eps) pair (``sampling.predict_pair``): also where
    alpha_t = 0 (a flow model at t = 1); on a flow path it is the Euler step t -> t_end."""
    to = tuple(v.to(x_t.device) for v in schedule.alpha_sigma(t_end))
    out = affine_jump(x0, eps, *to)
    same = (t_end == t).to(x_t.device).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return torch.where(same, x_t, out)


def renoise(schedule: Schedule, x_s: Tensor, s: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Forward diffusion of a point at timestep s to t >= s (B, ...) through the path's
    transition kernel (``sampling.renoise``; TCD's re-noise, eq. 19)."""
    at = tuple(v.to(x_s.device) for v in schedule.alpha_sigma(s))
    to = tuple(v.to(x_s.device) for v in schedule.alpha_sigma(t))
    return forward_kernel(x_s, at, to, noise)


# ---------------------------------------------------------------- stage schedule

def stage_at(step: int, steps_per_stage: list[int] | tuple[int, ...]) -> int:
    """Index of the stage that global step ``step`` (0-based, the number of generator updates
    done) belongs to; stages run back to back and the last one continues past its budget."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not steps_per_stage:
        raise ValueError("no stages")
    end = 0
    for i, n in enumerate(steps_per_stage):
        end += int(n)
        if step < end:
            return i
    return len(steps_per_stage) - 1
