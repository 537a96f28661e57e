"""One DeepSpeed engine per trainable role: the only caller of ``deepspeed.initialize``.

Each trainable role (generator, fake score, later a discriminator head) gets its own
engine and its own DeepSpeed config, built from ``TrainSection``: ZeRO stage 0-3,
bf16/fp16 where the device can, gradient accumulation, gradient clipping, the project's
AdamW (a torch optimizer handed to DeepSpeed) and its warmup + cosine LR schedule (kept
outside the engine, stepped by ``step.update`` like a plain torch role's). Frozen roles
are never wrapped. The same code runs on CPU workers (gloo) and GPU workers (NCCL).

``EngineRole`` plugs into the generic step (``step.update``): the active role's loss calls
the engine; the guard checks every micro-batch loss and every local gradient (a hook per
parameter, before reduction) on every rank before ``engine.step()``; a skipped update
still goes through ``engine.step()`` (so DeepSpeed drops its gradient buffers and keeps
its counters) with the wrapped torch optimizer's ``step`` disabled, so the optimizer
state is untouched. Under ZeRO-3 the parameters are partitioned: ``full_params`` gathers
them (``deepspeed.zero.GatheredParameters``) for EMA updates, ``full_state_dict``
consolidates the fp32 master weights for exports.
"""
from __future__ import annotations

import importlib
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from hyperscale.train.step import Role, trainable_parameters

TAG = "state"  # the DeepSpeed checkpoint tag inside each role's directory
_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_lambda(t, total: int) -> Callable[[int], float]:
    """Linear warmup over ``t.lr_warmup_steps`` updates, then cosine to ``lr * t.lr_min_ratio``."""
    def f(step: int) -> float:
        if step < t.lr_warmup_steps:
            return (step + 1) / t.lr_warmup_steps
        frac = min(1.0, (step - t.lr_warmup_steps) / max(1, total - t.lr_warmup_steps))
        return t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


def resolve_precision(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The low-precision dtype for ``train.mixed_precision`` on ``device``, or a clear error."""
    dtype = _PRECISION[mixed_precision]
    if dtype is None:
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported() if dtype == torch.bfloat16 else True
    else:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        ok = acc.is_bf16_supported() if dtype == torch.bfloat16 else acc.is_fp16_supported()
    if not ok:
        raise ValueError(f"train.mixed_precision={mixed_precision}: this {device.type} device cannot train in "
                         f"{mixed_precision} (DeepSpeed's accelerator says unsupported); use "
                         f"{'bf16 or ' if mixed_precision == 'fp16' else ''}'no'")
    return dtype


def init_distributed(backend: str) -> None:
    """Join the process group Ray Train made (a no-op for the group itself) so DeepSpeed's
    comm layer knows it. Skips the shared-memory op JIT build (20-80 s on CPU; it only
    serves inference all-reduce; docs/stack.md §2)."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def deepspeed_config(t, micro_batch: int, world: int, numel: int, precision: torch.dtype | None) -> dict:
    """The DeepSpeed config of one role. ``numel``: the role's parameter count, which sizes the
    communication buckets (DeepSpeed's 5e8-element default allocates GBs per engine): one
    bucket holds the whole role, between 2**20 and 2**29 elements."""
    bucket = min(2 ** 29, max(2 ** 20, -(-numel // 1024) * 1024))  # a multiple of DeepSpeed's alignment
    zero: dict[str, Any] = {"stage": t.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                            "contiguous_gradients": True, "overlap_comm": False}
    if t.zero_stage == 3:
        # Partition every parameter (the default keeps those under 1e5 elements whole on every
        # rank, which for small nets means nothing is partitioned at all).
        zero |= {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": bucket,
                 "stage3_max_live_parameters": max(bucket, 10 ** 6), "stage3_max_reuse_distance": 0}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": micro_batch * t.gradient_accumulation_steps * world,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # a client torch AdamW, no JIT-built CPU Adam
        "bf16": {"enabled": precision == torch.bfloat16, "check_grad_overflow": True},
        "fp16": {"enabled": precision == torch.float16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }


def cast_parameters_(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Parameters (not buffers: noise schedules stay exact) to ``dtype``; for frozen roles."""
    if dtype is not None:
        for p in module.parameters():
            p.data = p.data.to(dtype)
    return module


def make_optimizer(params, t) -> torch.optim.AdamW:
    """The project's AdamW (the same for plain torch and engine roles)."""
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                             weight_decay=t.weight_decay)


def build_role(name: str, module: nn.Module, t, micro_batch: int, world: int, device: torch.device) -> Role:
    """A trainable role per ``t.engine``: a DeepSpeed engine, or plain torch (ZeRO stage 0 only).
    ``module`` must already be on ``device`` and identical on every rank."""
    precision = resolve_precision(t.mixed_precision, device)
    module.train()
    params = trainable_parameters(module)
    module.requires_grad_(False)
    for p in params:  # DeepSpeed hooks (and partitions the optimizer over) exactly these
        p.requires_grad_(True)
    if t.engine == "torch":
        opt = make_optimizer(params, t)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, t.max_steps))
        return Role(name, module, opt, sched, t.max_grad_norm, t.gradient_accumulation_steps, precision)
    import deepspeed

    cfg = deepspeed_config(t, micro_batch, world, sum(p.numel() for p in module.parameters()), precision)
    buffers = [(m, dict(m._buffers)) for m in module.modules()]
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=make_optimizer(params, t), config=cfg)
    for m, kept in buffers:  # DeepSpeed casts whole modules to bf16/fp16; buffers (schedules) keep theirs
        for key, b in kept.items():
            now = m._buffers.get(key)
            if b is not None and now is not None and now.dtype != b.dtype:
                m._buffers[key] = b.to(now.device)
    opt = engine.basic_optimizer  # the torch AdamW DeepSpeed steps (on its flat partitions under ZeRO)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, t.max_steps))
    return EngineRole(name, engine.module, opt, sched, t.max_grad_norm, t.gradient_accumulation_steps,
                      precision, engine=engine)


@contextmanager
def _step_disabled(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Make ``optimizer.step()`` a no-op (an instance attribute shadows the method, or the LR
    scheduler's wrapper of it), so DeepSpeed can run its step bookkeeping without an update."""
    had = "step" in vars(optimizer)
    old = vars(optimizer).get("step")
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if had:
            optimizer.step = old
        else:
            del optimizer.step


class _FullParams:
    """What ``EMA.update`` reads (``parameters()``, ``buffers()``), cast to fp32 for EMAs of
    low-precision engines."""

    def __init__(self, module: nn.Module):
        self._params = [p.detach().float() for p in module.parameters()]
        self._buffers = [b.detach().float() if b.is_floating_point() else b for b in module.buffers()]

    def parameters(self) -> Iterator[Tensor]:
        return iter(self._params)

    def buffers(self) -> Iterator[Tensor]:
        return iter(self._buffers)


@dataclass
class EngineRole(Role):
    """A role trained by a DeepSpeed engine (``module`` is ``engine.module``, ``optimizer`` the
    torch AdamW inside it)."""
    engine: Any = None
    _flag: Tensor | None = field(default=None, init=False, repr=False)
    _pre_norm: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._flag = torch.ones((), dtype=torch.bool, device=next(self.module.parameters()).device)
        for p in self.params:  # local gradients, before any reduction or partitioning
            p.register_hook(self._check_grad)

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def _check_grad(self, grad: Tensor) -> None:
        self._flag.logical_and_(torch.isfinite(grad).all())

    def forward_module(self) -> nn.Module:
        return self.engine

    def zero_grad(self) -> None:
        self._flag.fill_(True)
        self.engine.zero_grad()

    def backward(self, loss: Tensor, boundary: bool) -> None:
        self.engine.backward(loss)  # DeepSpeed scales by 1/accumulation and reduces at the boundary
        if not boundary:
            self.engine.step()  # a micro-step: DeepSpeed only counts it

    def reduce(self) -> Tensor:
        if self.zero_stage == 0 and self.engine.optimizer is self.optimizer:
            # Plain fp32 data parallel: DeepSpeed keeps no norm; the gradients are all-reduced here.
            grads = [p.grad for p in self.params if p.grad is not None]
            self._pre_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        return self._flag.to(torch.float32)

    def apply(self, ok: bool) -> tuple[float, bool]:
        with nullcontext() if ok else _step_disabled(self.optimizer):
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = self._pre_norm if norm is None else float(norm)
        return (math.nan if norm is None else norm), ok and bool(self.engine.was_step_applied())

    def _gathered(self):
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    @contextmanager
    def full_params(self) -> Iterator[nn.Module]:
        """Collective under ZeRO-3 (every rank must enter): the whole module gathered at once."""
        with self._gathered():
            low = any(p.dtype != torch.float32 for p in self.module.parameters())
            yield _FullParams(self.module) if low else self.module

    def full_state_dict(self) -> dict[str, Tensor]:
        """Collective: the fp32 master weights of the trained parameters (consolidated from every
        rank's shard), the other parameters and the buffers as held, all on CPU."""
        from deepspeed.utils import safe_get_full_fp32_param

        trained = {id(p) for p in self.params}
        flags = [(p, p.requires_grad) for p in self.module.parameters()]
        for p in self.params:  # DeepSpeed only consolidates parameters that require grad
            p.requires_grad_(True)
        out = {}
        try:
            with self._gathered():
                for name, p in self.module.named_parameters():
                    full = safe_get_full_fp32_param(p) if id(p) in trained else None
                    out[name] = (p if full is None else full).detach().float().cpu().clone()
                keep = self.module.state_dict().keys()
                out |= {n: b.detach().cpu().clone() for n, b in self.module.named_buffers() if n in keep}
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return out

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "zero_stage": self.zero_stage,
                "world_size": int(self.engine.dp_world_size)}

    def load_state_dict(self, state: dict) -> None:
        if "module" in state:
            raise ValueError(f"role '{self.name}': the checkpoint was written by train.engine=torch; "
                             f"resume with train.engine=torch")
        if state["world_size"] != self.engine.dp_world_size or state["zero_stage"] != self.zero_stage:
            raise ValueError(f"role '{self.name}': the checkpoint holds ZeRO-{state['zero_stage']} shards of "
                             f"{state['world_size']} workers; resume with train.zero_stage={state['zero_stage']} "
                             f"train.num_workers={state['world_size']} (this run: ZeRO-{self.zero_stage}, "
                             f"{self.engine.dp_world_size} workers)")
        self.scheduler.load_state_dict(state["scheduler"])

    def save_shards(self, directory: Path) -> None:
        """Collective: every rank writes its shard under ``directory/<role>``."""
        self.engine.save_checkpoint(str(Path(directory) / self.name), tag=TAG, save_latest=False)

    def load_shards(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(Path(directory) / self.name), tag=TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}/{self.name}: no DeepSpeed checkpoint '{TAG}' for role '{self.name}'")
