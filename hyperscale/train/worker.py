"""The per-worker training loop that Ray Train runs in every worker process.

Everything arrives through ``train_loop_config`` (the resolved config tree as a
dict); nothing comes from module globals. Builds the roles the method asks for,
restores a checkpoint when there is one, runs the generic two-player step, and
reports metrics and checkpoints through ``ray.train.report``.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from hyperscale.config import Config, from_dict, to_yaml
from hyperscale.data.fashion_mnist import load_fashion_mnist
from hyperscale.data.shards import shard_dataset
from hyperscale.data.stream import InMemoryStream, LabelStream, ShardStream
from hyperscale.methods.base import Batch
from hyperscale.methods.registry import build_method
from hyperscale.models.build import build_denoiser, load_denoiser, save_denoiser
from hyperscale.models.ema import EMA
from hyperscale.train import checkpoint as ckpt
from hyperscale.train.step import Role, StepCounters, broadcast_from_rank0, two_player_step


def _lr_lambda(t, total: int):
    def f(step: int) -> float:
        if step < t.lr_warmup_steps:
            return (step + 1) / t.lr_warmup_steps
        frac = min(1.0, (step - t.lr_warmup_steps) / max(1, total - t.lr_warmup_steps))
        return t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


def build_roles(cfg: Config, method):
    teacher = None
    if method.needs_teacher:
        if not cfg.model.pretrained_teacher_model:
            raise ValueError(f"method '{cfg.method.name}' needs model.pretrained_teacher_model")
        teacher = load_denoiser(cfg.model.pretrained_teacher_model).eval().requires_grad_(False)
    roles = {}
    t = cfg.train
    for name in method.trainable:
        module = copy.deepcopy(teacher) if name in method.init_from_teacher else build_denoiser(cfg.model, cfg.schedule)
        module.train()
        opt = torch.optim.AdamW(module.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t, t.max_steps))
        roles[name] = Role(name, module, opt, sched, t.max_grad_norm)
    frozen = {"teacher": teacher} if teacher is not None else {}
    return roles, frozen


def build_stream(cfg: Config, method, rank: int, world: int) -> InMemoryStream | LabelStream | ShardStream:
    if not method.needs_data:  # data-free: class labels only
        return LabelStream(cfg.data.batch_size, cfg.model.num_classes, rank, seed=cfg.run.seed)
    if cfg.data.train_shards_path_or_url:  # local or s3:// shards, split by rank (read from torch.distributed)
        return shard_dataset(cfg.data.train_shards_path_or_url, cfg.data.batch_size, seed=cfg.run.seed)
    images, labels = load_fashion_mnist(cfg.data.split, cfg.data.root).tensors()
    return InMemoryStream(images, labels, cfg.data.batch_size, rank, world, seed=cfg.run.seed)


@torch.no_grad()
def write_sample_grid(method, model, cfg: Config, path: Path) -> None:
    """10 x 10 samples from the (EMA) generator, one class per row, fixed seed."""
    from hyperscale.eval.images import save_grid

    labels = torch.arange(10).repeat_interleave(10) % cfg.model.num_classes
    z = torch.randn((len(labels), cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size),
                    generator=torch.Generator().manual_seed(cfg.run.seed))
    save_grid(method.sample(model.eval(), z, labels).clamp(-1, 1), path, nrow=10)


def train_loop(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank ...
    method = build_method(cfg.method)
    roles, frozen = build_roles(cfg, method)
    for role in roles.values():
        broadcast_from_rank0(role.module)  # ... and made identical for certain, as DDP does
    torch.manual_seed(cfg.run.seed * 1000 + rank)  # then per-rank noise and time draws
    gen_name = method.trainable[0]
    ema = EMA(roles[gen_name].module, cfg.train.ema_decay, cfg.train.ema_warmup)
    stream = build_stream(cfg, method, rank, world)
    counters = StepCounters()

    run_root = Path(loop_config["run_root"])
    restore = ray.train.get_checkpoint()  # set after a worker-group restart
    if restore is not None:
        with restore.as_directory() as d:
            state = ckpt.read_checkpoint(Path(d))
    else:
        path = ckpt.resolve_resume(cfg.train.resume_from_checkpoint, run_root)
        state = ckpt.read_checkpoint(path) if path else None
    if state is not None:
        for name, role in roles.items():
            role.module.load_state_dict(state["roles"][name]["module"])
            role.optimizer.load_state_dict(state["roles"][name]["optimizer"])
            role.scheduler.load_state_dict(state["roles"][name]["scheduler"])
        ema.load_state_dict(state["ema"])
        counters = StepCounters(**state["counters"])
        stream.load_state_dict(state["data"][min(rank, len(state["data"]) - 1)])
        ckpt.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        if rank == 0:
            print(f"[hyperscale] resumed at step {counters.step}", flush=True)

    def next_batch() -> Batch:
        x, y = next(stream)
        return Batch(cond=y, x0=x)

    def save_state(step: int) -> dict:
        # Per-rank data cursors and RNG streams are gathered so every rank resumes exactly.
        local = {"data": stream.state_dict(), "rng": ckpt.rng_state()}
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        return {"roles": {n: {"module": r.module.state_dict(), "optimizer": r.optimizer.state_dict(),
                              "scheduler": r.scheduler.state_dict()} for n, r in roles.items()},
                "ema": ema.state_dict(), "counters": counters.__dict__.copy(),
                "data": [g["data"] for g in gathered], "rng": [g["rng"] for g in gathered]}

    cfg_yaml = to_yaml(cfg)
    t0, s0 = time.time(), counters.step
    metrics: dict = {}
    while counters.step < cfg.train.max_steps:
        metrics = two_player_step(method, next_batch, roles, frozen, ema, counters)
        step = counters.step
        is_ckpt = step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps
        if step % cfg.train.log_every == 0 or is_ckpt:
            elapsed = time.time() - t0
            sps = (step - s0) * cfg.data.batch_size * world / max(elapsed, 1e-9)
            eta = (cfg.train.max_steps - step) * cfg.data.batch_size * world / max(sps, 1e-9)
            metrics |= {"step": step, "samples": counters.samples * world, "samples_per_s": sps}
            if rank == 0:
                losses = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss/"))
                print(f"[hyperscale] step {step}/{cfg.train.max_steps} {losses} "
                      f"{sps:.1f} samples/s ETA {eta / 60:.1f} min", flush=True)
        if is_ckpt:
            state = save_state(step)
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    d = ckpt.write_checkpoint(Path(tmp) / f"step_{step:08d}", state,
                                              {"step": step, "samples": counters.samples * world}, cfg_yaml)
                    checkpoint = ray.train.Checkpoint.from_directory(str(d))
                ray.train.report(metrics, checkpoint=checkpoint)
        elif step % cfg.train.log_every == 0:
            ray.train.report(metrics)

    if rank == 0:
        export = Path(loop_config["export_dir"])
        meta = method.export_meta(ema.model)
        save_denoiser(ema.model, export / "ema", meta | {"step": counters.step, "ema_decay": cfg.train.ema_decay})
        save_denoiser(roles[gen_name].module, export / "raw", meta | {"step": counters.step})
        write_sample_grid(method, ema.model, cfg, export.parent / "samples.png")
    if world > 1:
        dist.barrier()
