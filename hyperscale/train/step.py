"""The generic two-player step, written once for every method:
k critic updates, then one generator update, then EMA.

``Role`` bundles a trainable module with its optimizer and LR schedule and says how one
update runs on it: backward, gradient reduction, step. This class is the plain-torch
implementation (gradients averaged across ranks here, gloo on CPU, NCCL on GPU);
``hyperscale.train.engines.EngineRole`` is the DeepSpeed one. ``update`` holds the logic
both share: micro-batches (gradient accumulation), the one place ``requires_grad`` is
toggled, and the NaN/inf guard that skips a whole update on every rank alike, counts it
and reports it, leaving the optimizer state untouched.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hyperscale.methods.base import Batch, LossOut, Method
from hyperscale.models.ema import EMA
from hyperscale.models.cond import cond_len


@dataclass
class Role:
    """A trainable role trained with a plain torch optimizer (data parallel by all-reduce).

    accumulation: micro-batches per update (each from a fresh batch; loss scaled 1/accumulation).
    precision: autocast dtype for the forward passes of this role's updates (None: full precision).
    params: the parameters this role trains: those that require grad when the role is made (e.g.
    only LoRA weights), or all of them if none does (a frozen copy of the teacher).
    """
    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float
    accumulation: int = 1
    precision: torch.dtype | None = None
    params: list[nn.Parameter] = field(default_factory=list, init=False, repr=False)
    _grad_norm: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.params = trainable_parameters(self.module)

    def forward_module(self) -> nn.Module:
        """What the loss calls while this role is the one being updated."""
        return self.module

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor, boundary: bool) -> None:
        """Backward of one micro-batch's mean loss; ``boundary``: the last micro-batch of the update."""
        (loss / self.accumulation).backward()

    def reduce(self) -> Tensor:
        """After the last backward: average and clip gradients; returns this rank's finiteness
        flag (0-dim float, 1 = every gradient finite), to be combined across ranks."""
        _average_gradients(self.params)
        params = [p for p in self.params if p.grad is not None]
        self._grad_norm = (torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm) if params
                           else torch.zeros(()))
        return torch.isfinite(self._grad_norm).to(torch.float32)

    def apply(self, ok: bool) -> tuple[float, bool]:
        """Step the optimizer if ``ok`` (the same on every rank), else drop the gradients.
        Returns (pre-clip global gradient norm, whether the update was applied)."""
        if ok:
            self.optimizer.step()
        self.zero_grad()
        return float(self._grad_norm), ok

    @contextmanager
    def full_params(self) -> Iterator[nn.Module]:
        """The module with full (unpartitioned) parameters, for EMA updates and exports."""
        yield self.module

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full fp32 weights on CPU, the same on every rank (collective for engines)."""
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    # Checkpoint state. Plain torch roles keep everything in the rank-0 state file; engines
    # also write per-rank shards (save_shards / load_shards).
    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "module" not in state:
            raise ValueError(f"role '{self.name}': the checkpoint holds DeepSpeed engine shards; "
                             f"resume with train.engine=deepspeed")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def settings(self) -> list[dict]:
        """This run's optimizer settings per parameter group: the base lr of the schedule, betas,
        eps, weight decay (a checkpoint's optimizer state carries its own; see ``use_settings``)."""
        return [{"lr": base, **{k: g[k] for k in _SETTINGS if k in g}}
                for base, g in zip(self.scheduler.base_lrs, self.optimizer.param_groups)]

    def use_settings(self, settings: list[dict]) -> list[str]:
        """After a restore, put this run's ``settings`` back over the checkpoint's, so a resumed run
        with a new ``train.lr`` (or betas, ...) trains with it; the schedule keeps its restored
        position. Returns what changed, e.g. "lr 5e-05 -> 1e-05", for the console."""
        changed, sched = [], self.scheduler
        for g, base, own in zip(self.optimizer.param_groups, sched.base_lrs, settings):
            for k in _SETTINGS:
                if k in own and _plain(g.get(k)) != _plain(own[k]):
                    changed.append(f"{k} {g.get(k)} -> {own[k]}")
                    g[k] = own[k]
            if base != own["lr"]:
                changed.append(f"lr {base:g} -> {own['lr']:g}")
        sched.base_lrs = [own["lr"] for own in settings]
        for g, base, f in zip(self.optimizer.param_groups, sched.base_lrs, getattr(sched, "lr_lambdas", ())):
            g["initial_lr"] = base
            g["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        return list(dict.fromkeys(changed))

    def save_shards(self, directory) -> None:
        """Per-rank state beside the rank-0 state file (none for plain torch roles)."""

    def load_shards(self, directory) -> None:
        """Restore what ``save_shards`` wrote."""


_SETTINGS = ("betas", "eps", "weight_decay")  # optimizer settings a resumed run takes from its config


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass
class StepCounters:
    step: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad now, or all of them if none does."""
    return [p for p in module.parameters() if p.requires_grad] or list(module.parameters())


@contextmanager
def only_trainable(active: Role | None, roles: list[Role]):
    """The one place ``requires_grad`` is toggled: only ``active``'s trainable parameters get
    gradients; every role's parameters are frozen outside an update."""
    for r in roles:
        r.module.requires_grad_(False)
    if active is not None:
        for p in active.params:
            p.requires_grad_(True)
    try:
        yield
    finally:
        for r in roles:
            r.module.requires_grad_(False)


def _average_gradients(params: list[nn.Parameter]) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_from_rank0(module: nn.Module) -> None:
    """Make every rank's parameters and buffers equal to rank 0's."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite on every rank (one MIN all-reduce)."""
    ok = torch.isfinite(x).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def _autocast(role: Role, device: torch.device):
    return torch.autocast(device.type, dtype=role.precision) if role.precision is not None else nullcontext()


def update(role: Role, loss_fn: Callable[[], LossOut], all_roles: list[Role], counters: StepCounters,
           after_backward: Callable[[Role], None] | None = None) -> dict[str, float]:
    """One optimizer update of ``role`` over ``role.accumulation`` micro-batches (``loss_fn``
    draws a fresh batch per call): forward, backward, reduce, guard, step.

    The guard: every micro-batch loss and this rank's gradient flag are checked on every rank
    (one all-reduce) before stepping; a non-finite value anywhere skips the update on all ranks
    alike: the gradients are dropped, the optimizer state is not touched, the LR schedule
    advances as for any update, and ``counters.skipped[role.name]`` counts it.
    ``after_backward``: called after the last backward, before the step (measurements).
    """
    losses: list[Tensor] = []
    with only_trainable(role, all_roles):
        role.zero_grad()
        device = next(role.module.parameters()).device
        for i in range(role.accumulation):
            with _autocast(role, device):
                out = loss_fn()
            loss = out.loss.float().mean()
            role.backward(loss, boundary=i == role.accumulation - 1)
            losses.append(loss.detach())
        if after_backward is not None:
            after_backward(role)
        grads_ok = role.reduce()
        finite = _all_finite(torch.cat([torch.stack(losses).reshape(-1), grads_ok.reshape(1).to(losses[0])]))
        grad_norm, applied = role.apply(finite)
        if not applied:  # skipped by the guard (or by DeepSpeed's own overflow check)
            counters.skipped[role.name] = counters.skipped.get(role.name, 0) + 1
        role.scheduler.step()
    mean_loss = float(torch.stack(losses).mean())
    metrics = {f"loss/{role.name}": mean_loss if finite else math.nan,
               f"grad_norm/{role.name}": grad_norm, f"lr/{role.name}": role.scheduler.get_last_lr()[0],
               f"nonfinite_skipped/{role.name}": counters.skipped.get(role.name, 0)}
    metrics.update({k: float(v) for k, v in out.metrics.items()})
    return metrics


def role_models(roles: dict[str, Role], frozen: dict[str, nn.Module], active: Role) -> dict[str, nn.Module]:
    """The models a loss gets by role name while ``active`` is updated: ``active`` through
    ``forward_module()`` (its DeepSpeed engine, if any), the others as plain modules."""
    return {n: (r.forward_module() if r is active else r.module) for n, r in roles.items()} | frozen


def two_player_step(method: Method, batches: Callable[[], Batch], roles: dict[str, Role],
                    frozen: dict[str, nn.Module], ema: EMA | None, counters: StepCounters) -> dict[str, float]:
    """k critic updates, one generator update (each micro-batch on a fresh batch), then EMA."""
    all_roles = list(roles.values())
    metrics: dict[str, float] = {}
    if method.critic is not None:
        critic = roles[method.critic]
        for _ in range(method.critic_steps()):
            metrics |= update(critic, lambda: method.critic_loss(batches(), **role_models(roles, frozen, critic)),
                              all_roles, counters)
    gen = roles[method.generator]
    drawn: list[int] = []

    def gen_loss() -> LossOut:
        b = batches()
        drawn.append(cond_len(b.cond))
        return method.generator_loss(b, **role_models(roles, frozen, gen))

    metrics |= update(gen, gen_loss, all_roles, counters)
    if ema is not None:
        with gen.full_params() as full:
            ema.update(full)
    counters.step += 1
    counters.samples += sum(drawn)
    return metrics
