"""The generic two-player step, written once for every method:
k critic updates, then one generator update, then EMA.

``Role`` bundles a trainable module with its optimizer and LR schedule. Gradients
are averaged across ranks here (gloo on CPU, NCCL on GPU); the NaN/inf guard
skips a whole update (on every rank alike), counts it and reports it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hyperscale.methods.base import Batch, LossOut, Method
from hyperscale.models.ema import EMA


@dataclass
class Role:
    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float


@dataclass
class StepCounters:
    step: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


@contextmanager
def only_trainable(active: nn.Module | None, all_roles: list[nn.Module]):
    """The one place ``requires_grad`` is toggled: only ``active``'s parameters get gradients."""
    for m in all_roles:
        m.requires_grad_(m is active)
    try:
        yield
    finally:
        for m in all_roles:
            m.requires_grad_(False)


def _average_gradients(module: nn.Module) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
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
    ok = torch.isfinite(x).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def update(role: Role, loss_fn: Callable[[], LossOut], all_modules: list[nn.Module],
           counters: StepCounters) -> dict[str, float]:
    """One optimizer update of ``role``: forward, backward, average, guard, clip, step."""
    with only_trainable(role.module, all_modules):
        role.optimizer.zero_grad(set_to_none=True)
        out = loss_fn()
        loss = out.loss.mean()
        loss.backward()
        _average_gradients(role.module)
        params = [p for p in role.module.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, role.max_grad_norm) if params else torch.zeros(())
        finite = _all_finite(torch.stack([loss.detach(), grad_norm.detach()]))
        if finite:
            role.optimizer.step()
        else:  # skip, count, report; the optimizer state stays untouched
            counters.skipped[role.name] = counters.skipped.get(role.name, 0) + 1
        role.optimizer.zero_grad(set_to_none=True)
        role.scheduler.step()
    metrics = {f"loss/{role.name}": float(loss.detach()) if finite else math.nan,
               f"grad_norm/{role.name}": float(grad_norm), f"lr/{role.name}": role.scheduler.get_last_lr()[0],
               f"nonfinite_skipped/{role.name}": counters.skipped.get(role.name, 0)}
    metrics.update({k: float(v) for k, v in out.metrics.items()})
    return metrics


def two_player_step(method: Method, batches: Callable[[], Batch], roles: dict[str, Role],
                    frozen: dict[str, nn.Module], ema: EMA | None, counters: StepCounters) -> dict[str, float]:
    """k critic updates (each on a fresh batch), one generator update, then EMA."""
    modules = {n: r.module for n, r in roles.items()} | frozen
    all_modules = list(roles[n].module for n in roles)
    metrics: dict[str, float] = {}
    if method.critic is not None:
        for _ in range(method.critic_steps()):
            b = batches()
            metrics |= update(roles[method.critic], lambda: method.critic_loss(b, **modules), all_modules, counters)
    b = batches()
    gen = roles[method.trainable[0]]
    metrics |= update(gen, lambda: method.generator_loss(b, **modules), all_modules, counters)
    if ema is not None:
        ema.update(gen.module)
    counters.step += 1
    counters.samples += b.cond.shape[0]
    return metrics
