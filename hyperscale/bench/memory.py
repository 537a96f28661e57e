"""Per-rank memory of every trainable role under ZeRO 0-3, and trainer throughput
(docs/benchmarks.md §8): ``python jobs/bench.py --suite memory``.

Memory is measured from the tensors each rank really holds (storages counted once, so views
into DeepSpeed's flat buffers are not double counted): parameters (under ZeRO-3 the rank's
partitions), the fp32 master copy the optimizer steps when it is a separate tensor, gradients
between the last backward and the step (``.grad`` plus DeepSpeed's gradient partitions and
buckets), and optimizer state (AdamW moments and step counts). Theory: ZeRO-0's figure / N for
optimizer state at stage >= 1, gradients at >= 2, parameters at 3.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from hyperscale.train.step import Role


def _storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the storages behind ``tensors`` (views share one entry)."""
    out = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.numel() > 0:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _walk(obj, depth: int = 0) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1)
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, depth + 1)


def param_tensors(role: Role) -> list[Tensor]:
    """The parameter tensors this rank holds (under ZeRO-3 its partitions, ``ds_tensor``)."""
    out = []
    for p in role.module.parameters():
        out.append(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    return out


def grad_tensors(role: Role) -> list[Tensor]:
    """Gradient tensors this rank holds: ``.grad`` of the module's parameters plus the gradient
    buffers of DeepSpeed's optimizer wrapper (flat partitions, accumulation and bucket buffers)."""
    out = [p.grad for p in role.module.parameters() if p.grad is not None]
    wrapper = getattr(getattr(role, "engine", None), "optimizer", None)
    if wrapper is not None and wrapper is not role.optimizer:
        for name, value in vars(wrapper).items():
            if "grad" in name or name.startswith("ipg_buffer"):
                out.extend(_walk(value))
    return out


def memory_footprint(role: Role) -> dict[str, int]:
    """Bytes this rank holds for ``role``: parameters, fp32 master weights the optimizer updates
    (when they are a separate copy), gradients (meaningful between backward and step) and
    optimizer state (Adam moments and step counts)."""
    params = _storages(param_tensors(role))
    stepped = [p for g in role.optimizer.param_groups for p in g["params"]] + list(role.optimizer.state)
    master = {k: v for k, v in _storages(stepped).items() if k not in params}
    grads = {k: v for k, v in _storages(grad_tensors(role)).items() if k not in params}
    optim = _storages(_walk(list(role.optimizer.state.values())))
    return {"param_bytes": sum(params.values()), "master_bytes": sum(master.values()),
            "grad_bytes": sum(grads.values()), "optim_bytes": sum(optim.values())}


# ------------------------------------------------------------------------ measurement

@dataclass
class MemorySettings:
    teacher: str = "assets/teacher"  # the trained architecture (1.1 M parameters), SIM roles copy it
    batch_size: int = 32
    workers: int = 2
    stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    mixed_precision: str = "no"
    throughput_steps: int = 30  # teacher.yaml steps per throughput run
    throughput_batch: int = 64
    # a preset (and overrides) to measure instead of SIM on ``teacher``: e.g. a *-tiny twin
    config: str | None = None
    overrides: list[str] = field(default_factory=list)


def probe_config(stage: int, world: int, s: MemorySettings):
    """The config ``probe`` measures: ``s.config`` (or SIM on ``s.teacher``) at ``stage``."""
    from hyperscale.config import load_config

    base = [] if s.config else ["method.name=sim", f"model.pretrained_teacher_model={s.teacher}"]
    return load_config(s.config, base + list(s.overrides) + [
        f"train.zero_stage={stage}", f"train.mixed_precision={s.mixed_precision}", "train.engine=deepspeed",
        f"data.batch_size={s.batch_size}", f"train.num_workers={world}"])


def held_bytes(module) -> int:
    """Parameter bytes a frozen module holds (storages counted once)."""
    return sum(_storages(p.data for p in module.parameters()).values())


def frontend_modules(model) -> dict:
    """The frozen text encoders and VAE a text-to-image denoiser shares (loaded), by component name."""
    from torch import nn

    from hyperscale.models.denoiser import unwrap

    holder = unwrap(model, lambda m: hasattr(m, "frontend"))
    pipe = getattr(getattr(holder, "frontend", None), "_pipe", None)
    return {} if pipe is None else {n: m for n, m in pipe.components.items() if isinstance(m, nn.Module)}


def probe(rank: int, world: int, stages: list[int], s: MemorySettings) -> list[dict]:
    """``probe_stage`` for each of ``stages`` in turn (one process group: one start-up)."""
    return [row for stage in stages for row in probe_stage(rank, world, stage, s)]


def probe_stage(rank: int, world: int, stage: int, s: MemorySettings) -> list[dict]:
    """On each of ``world`` ranks: the method's roles as the trainer builds them (``build_modules``,
    the generator's EMA, one engine per trainable role at ``stage``); two updates per trainable
    role, measured after the second's backward and step. Frozen roles, the EMA and the frontend
    (text encoders and VAE, one per process) are rows of parameter bytes."""
    from hyperscale.methods import build_method
    from hyperscale.models.ema import EMA
    from hyperscale.train import engines
    from hyperscale.train.loop import build_modules, build_stream, draw_batch
    from hyperscale.train.step import StepCounters, role_models, update, trainable_parameters

    engines.init_distributed("gloo")
    cfg = probe_config(stage, world, s)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    method = build_method(cfg.method)
    built = build_modules(cfg, method, cpu)
    gen = built.trainable[method.generator]
    ema = EMA(gen, cfg.train.ema_decay, cfg.train.ema_warmup)  # as the loop keeps it
    numels = {n: (sum(p.numel() for p in m.parameters()), sum(p.numel() for p in trainable_parameters(m)))
              for n, m in built.trainable.items()}
    roles = {n: engines.build_role(n, m, cfg.train, s.batch_size, world, cpu) for n, m in built.trainable.items()}
    stream = build_stream(cfg, method, gen, rank, world)
    counters, rows = StepCounters(), []
    head = {"zero_stage": stage, "workers": world, "rank": rank}
    for name, role in roles.items():
        loss = method.critic_loss if name == method.critic else method.generator_loss
        measured: dict[str, int] = {}
        for _ in range(2):
            update(role, lambda: loss(draw_batch(stream, gen, cpu), **role_models(roles, built.frozen, role)),
                   list(roles.values()), counters, after_backward=lambda r: measured.update(memory_footprint(r)))
        after = memory_footprint(role)
        rows.append(head | {"role": name, "kind": built.specs[name].kind, "numel": numels[name][0],
                            "trainable_numel": numels[name][1], "param_bytes": after["param_bytes"],
                            "master_bytes": after["master_bytes"], "grad_bytes": measured["grad_bytes"],
                            "optim_bytes": after["optim_bytes"]})
    held = dict(built.frozen) | {"ema": ema.model}
    held |= {f"frontend/{n}": m for n, m in frontend_modules(gen).items()}
    for name, module in held.items():
        kind = "ema" if name == "ema" else "frontend" if name.startswith("frontend/") else "frozen"
        rows.append(head | {"role": name, "kind": kind, "numel": sum(p.numel() for p in module.parameters()),
                            "trainable_numel": 0, "param_bytes": held_bytes(module), "master_bytes": 0,
                            "grad_bytes": 0, "optim_bytes": 0})
    return rows


def with_theory(rows: list[dict]) -> list[dict]:
    """Add theory_* (ZeRO-0's figure of the same role and rank / N where the stage partitions it)
    and optim_ratio (measured / theory; None for roles without optimizer state)."""
    base = {(r["role"], r["rank"]): r for r in rows if r["zero_stage"] == 0}
    for r in rows:
        b, n = base[(r["role"], r["rank"])], r["workers"]
        r["theory_optim_bytes"] = b["optim_bytes"] // (n if r["zero_stage"] >= 1 else 1)
        r["theory_grad_bytes"] = b["grad_bytes"] // (n if r["zero_stage"] >= 2 else 1)
        r["theory_param_bytes"] = b["param_bytes"] // (n if r["zero_stage"] >= 3 else 1)
        r["optim_ratio"] = round(r["optim_bytes"] / r["theory_optim_bytes"], 4) if r["theory_optim_bytes"] else None
    return rows


def throughput(s: MemorySettings, work: Path) -> list[dict]:
    """samples/s of teacher.yaml (the shipped teacher's architecture) through Ray Train with 1 and
    2 workers, checkpoint save time, size and resume time (ZeRO-2, run_training end to end)."""
    from hyperscale.config import load_config
    from hyperscale.storage.local import REPO
    from hyperscale.train.checkpoint import find_latest
    from hyperscale.train.launch import run_training

    rows = []
    for workers in (1, 2):
        out = work / f"w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        base = [f"run.output_dir={out}", f"train.num_workers={workers}", f"data.batch_size={s.throughput_batch}",
                f"train.max_steps={s.throughput_steps}", f"train.checkpoint_every={s.throughput_steps // 2}",
                f"train.log_every={s.throughput_steps // 2}", "train.zero_stage=2"]
        t0 = time.perf_counter()
        m = run_training(load_config(REPO / "jobs/configs/teacher.yaml", base))
        wall = time.perf_counter() - t0
        ckpt = find_latest(out / "checkpoints")
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        r = run_training(load_config(REPO / "jobs/configs/teacher.yaml", base[:4] + [
            f"train.max_steps={s.throughput_steps + 1}", "train.checkpoint_every=1000000", "train.log_every=1",
            "train.resume_from_checkpoint=latest", "train.zero_stage=2"]))
        rows.append({"workers": workers, "zero_stage": 2, "batch_per_worker": s.throughput_batch,
                     "steps": s.throughput_steps, "samples_per_s": round(m["samples_per_s"], 2),
                     "checkpoint_save_s": round(m["time/checkpoint_save_s"], 3), "checkpoint_bytes": size,
                     "engine_init_s": round(m["time/engine_init_s"], 3),
                     "resume_restore_s": round(r["time/restore_s"], 3),
                     "run_wall_s": round(wall, 1), "resume_run_wall_s": round(time.perf_counter() - t0, 1)})
    return rows


def measure(s: MemorySettings) -> list[dict]:
    """``probe``'s rows on ``s.workers`` local gloo ranks for every stage of ``s.stages``, with theory."""
    from hyperscale.train.local import run_local

    rows = [row for rank_rows in run_local(probe, s.workers, list(s.stages), s, timeout=3600) for row in rank_rows]
    print(f"[bench] memory: ZeRO-{','.join(map(str, s.stages))} measured", flush=True)
    return with_theory(rows) if 0 in s.stages else rows


def run_memory_suite(out_dir: str | Path, s: MemorySettings, command: str | None = None,
                     work: Path | None = None) -> Path:
    """docs/bench/memory.json: per-rank memory rows (with theory) and throughput rows."""
    import tempfile

    from hyperscale.storage.records import write_record
    from hyperscale.storage.local import REPO, absolute_local, atomic_file

    recorded = asdict(s)  # no machine paths in the record: the teacher relative to the repo when inside it
    if Path(s.teacher).resolve().is_relative_to(REPO):
        recorded["teacher"] = str(Path(s.teacher).resolve().relative_to(REPO))
    s.teacher = absolute_local(s.teacher)
    rows = measure(s)
    work = Path(work or tempfile.mkdtemp(prefix="hs-bench-"))
    speed = throughput(s, work)
    settings = recorded | {"method": "sim: generator and fake_score, both copies of the teacher",
                            "measured": "bytes per rank; grad_bytes between the last backward and the step"}
    path = write_record(out_dir, "memory", settings, rows, command)
    record = json.loads(path.read_text())
    record["throughput"] = speed  # trainer samples/s, checkpoint save/resume (Ray Train, teacher.yaml)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return path
