"""The training loop itself, independent of who runs it.

Ray Train runs it in every worker (``hyperscale.train.worker``); a Ray Tune trial runs it
directly in the trial's process as a single worker (``hyperscale.tune``). The two differ only
in the :class:`Session`: rank and world size, where a restarted run's checkpoint comes from,
and where metrics and checkpoints are reported.

The loop builds the roles the method declares (``Method.roles``; one DeepSpeed engine or plain
torch optimizer per trainable role; the frozen teacher, EMA copies and reward models), restores
a checkpoint, tells the method its global step (stage schedules), runs the generic two-player
step, evaluates on a fixed sample set when given an evaluator (``train.eval_every``), and
exports the generator (LoRA students as merged weights plus a diffusers/kohya LoRA).
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from hyperscale.config import Config, role_train, to_yaml
from hyperscale.data.fashion_mnist import load_fashion_mnist
from hyperscale.data.shards import shard_dataset
from hyperscale.data.stream import InMemoryStream, LabelStream
from hyperscale.methods.base import Batch
from hyperscale.methods import build_method
from hyperscale.methods.roles import Roles, build_roles
from hyperscale.storage.local import location, repo_relative, staged_dir
from hyperscale.models.build import EXPORT_META, build_denoiser, load_denoiser
from hyperscale.models.denoiser import unwrap
from hyperscale.models.ema import EMA
from hyperscale.models.families import family_of
from hyperscale.models.lora import save_student
from hyperscale.train import checkpoint as ckpt
from hyperscale.train import engines, preemption
from hyperscale.train.step import Role, StepCounters, broadcast_from_rank0, two_player_step
from hyperscale.train.text2image_data import grid_prompts, text2image_stream, to_model_inputs

# (generator sample function (z, labels) -> x0, global step) -> metrics such as "eval/fid"
Evaluator = Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int], dict]


class Session(Protocol):
    """What the loop needs from the framework that runs it."""
    rank: int
    world: int

    def restored(self) -> AbstractContextManager[Path | None]:
        """The framework's checkpoint after a restart of this run (a worker-group restart in
        Ray Train, a resumed trial in Tune), as a local directory; None on a first start."""

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """Report metrics (every rank), with this rank's checkpoint files when given."""

    def step_done(self, step: int) -> None:
        """Called on every rank after each generator update (``step`` updates done)."""

    # Optional: ``stop_requested() -> str | None``, asked on every rank at every step boundary:
    # a reason to checkpoint and stop now (hyperscale/train/preemption.py); absent: never.


@dataclass
class Paths:
    run_root: Path  # where this run's checkpoints live (Ray storage)
    export_dir: Path
    run_id: str | None = None  # tells a restart of this run from a new run in the same directory


def build_modules(cfg: Config, method, device: torch.device) -> Roles:
    """Every role the method declares (``methods.roles.build_roles``): trainable modules identical
    on every rank, on ``device``; the frozen teacher in the low-precision dtype when
    ``train.mixed_precision`` asks; EMA roles with their trackers; reward models."""
    def load_teacher() -> nn.Module:
        if not cfg.model.pretrained_teacher_model:
            raise ValueError(f"method '{cfg.method.name}' needs model.pretrained_teacher_model")
        teacher = load_denoiser(cfg.model.pretrained_teacher_model)
        found = family_of(teacher).name
        if found != cfg.model.family:
            raise ValueError(f"model.pretrained_teacher_model={cfg.model.pretrained_teacher_model} is a {found} model "
                             f"but the config says model.family={cfg.model.family}: use a {cfg.model.family} teacher "
                             f"or set model.family={found}")
        return teacher

    def prepare(_name: str, module: nn.Module) -> nn.Module:
        module = module.to(device)
        broadcast_from_rank0(module)  # identical for certain, as DDP does
        if cfg.model.gradient_checkpointing:  # on the network diffusers implements it for (its blocks)
            family_of(module).backbone(module).enable_gradient_checkpointing()
        return module

    def rewards(specs) -> nn.Module:
        from hyperscale.models.rewards import build_rewards

        return build_rewards(list(specs))

    roles = build_roles(method, teacher=load_teacher, fresh=lambda: build_denoiser(cfg.model, cfg.schedule),
                        rewards=rewards, prepare=prepare)
    precision = engines.resolve_precision(cfg.train.mixed_precision, device)
    for name, spec in roles.specs.items():
        if spec.init == "teacher":
            roles.frozen[name] = engines.cast_parameters_(roles.frozen[name].to(device), precision)
        elif spec.kind == "frozen":
            roles.frozen[name] = roles.frozen[name].to(device)
    frontend = getattr(unwrap(roles.trainable[method.generator], lambda m: hasattr(m, "frontend")), "frontend", None)
    if frontend is not None:  # text encoders and VAE, shared by every role: frozen, low precision where asked
        frontend.to(device, precision)
    return roles


def build_stream(cfg: Config, method, model: nn.Module, rank: int, world: int):
    """Batches of (x0 or None, conditions) for the method: class labels or prompts only for data-free
    methods; otherwise shards (class-label or caption shards) or the in-memory Fashion-MNIST set
    (as captioned images for a text-to-image family: text2image_data)."""
    d, family = cfg.data, family_of(model)
    if family.condition == "text":
        return text2image_stream(cfg, method, model, rank, world)
    if method.batch == "conditions":  # data-free: class labels only
        return LabelStream(d.batch_size, len(family.class_names(model)), rank, seed=cfg.run.seed)
    if d.train_shards_path_or_url:  # local or s3:// shards, split by rank (read from torch.distributed)
        return shard_dataset(d.train_shards_path_or_url, d.batch_size, seed=cfg.run.seed)
    images, labels = load_fashion_mnist(d.split, d.root).tensors()
    return InMemoryStream(images, labels, d.batch_size, rank, world, seed=cfg.run.seed)


def draw_batch(stream, model: nn.Module, device: torch.device) -> Batch:
    """The next batch of ``stream`` (``build_stream``) as the losses take it: data on ``device``,
    conditions encoded by ``model``'s family (class labels, or prompts through its text encoders)."""
    family = family_of(model)
    x, y, items = to_model_inputs(next(stream), family, model, device)
    return Batch(cond=family.encode_condition(model, y, device), x0=x, items=items).to(device)


@torch.no_grad()
def write_sample_grid(method, model, cfg: Config, path: Path) -> None:
    """10 x 10 samples from the (EMA) generator, fixed seed: one class per row, or for a
    text-to-image family one grid prompt per row (text2image_data.grid_prompts)."""
    from hyperscale.eval.images import save_grid

    device = next(model.parameters()).device
    family = family_of(model)
    if family.condition == "text":
        items = [p for p in grid_prompts(cfg) for _ in range(10)]
    else:
        items = torch.arange(10).repeat_interleave(10) % len(family.class_names(model))
    z = torch.randn((len(items),) + family.sample_shape(model), generator=torch.Generator().manual_seed(cfg.run.seed))
    x = method.sample(model.eval(), z.to(device), family.encode_condition(model, items, device))
    save_grid(family.decode(model, x).clamp(-1, 1).float().cpu(), path, nrow=10)


def export(method, gen: Role, ema: EMA, cfg: Config, step: int, export_dir: Path, rank: int,
           metrics: dict | None = None) -> None:
    """Collective: consolidate the generator (every rank's shard) into one export, loadable
    without DeepSpeed: export/ema and export/raw (fp32 master weights), samples.png. A LoRA
    student is saved as merged weights plus its LoRA (diffusers and kohya keys) in ``lora/``.
    An s3:// run directory gets them from a local staging dir, each export's metadata last."""
    raw = gen.full_state_dict()
    if rank != 0:
        return
    # the model card's facts (models/card.py): what made it, from what, and the last logged losses
    measured = {k: float(v) for k, v in (metrics or {}).items() if k.startswith("loss/")}
    meta = method.sampler(ema.model).to_extra() | {"run": cfg.run.name, "method": cfg.method.name,
                                                   "teacher": repo_relative(cfg.model.pretrained_teacher_model), "metrics": measured}
    with staged_dir(Path(export_dir).parent, last=(EXPORT_META,)) as run_dir:
        out = run_dir / Path(export_dir).name
        save_student(ema.model, out / "ema", meta | {"step": step, "ema_decay": cfg.train.ema_decay})
        model = copy.deepcopy(ema.model)
        model.load_state_dict(raw)
        save_student(model, out / "raw", meta | {"step": step})
        write_sample_grid(method, ema.model, cfg, run_dir / "samples.png")


@contextmanager
def restore_source(session: Session, t, paths: Paths) -> Iterator[tuple[Path | None, str]]:
    """The checkpoint to start from and where it came from. After a restart: the newer of the
    framework's latest checkpoint and this run's newest complete one in storage (a rank can die
    after every rank's files landed but before Ray registered the report). Otherwise
    ``train.resume_from_checkpoint`` (a path, ``latest``, or nothing: a fresh start)."""
    run_root = location(paths.run_root)  # a local directory or an s3:// prefix
    own = ckpt.find_latest(run_root, run_id=paths.run_id) if paths.run_id else None
    with session.restored() as d:
        choice = ["own" if own is not None and (d is None or ckpt.meta_step(own) > ckpt.meta_step(Path(d)))
                  else "ray" if d is not None else "config"]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)  # every rank restores the same checkpoint
        if choice[0] == "own":
            if own is None:
                raise FileNotFoundError(f"rank 0 restores from {run_root}, which this rank cannot see: "
                                        f"the run's storage must be shared by all workers")
            with ckpt.local_copy(own, session.rank) as local:  # S3: this rank's part, downloaded
                yield local, "this run's latest complete checkpoint"
        elif choice[0] == "ray":
            yield Path(d), "Ray's latest checkpoint"
        else:
            path = ckpt.resolve_resume(t.resume_from_checkpoint, run_root)
            with ckpt.local_copy(path, session.rank) as local:
                yield local, str(path)


def _single_process_group() -> None:
    """A world-size-1 gloo group for DeepSpeed when nobody made one (a Tune trial)."""
    from hyperscale.train.local import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def run(cfg: Config, session: Session, paths: Paths, device: torch.device,
        evaluate: Evaluator | None = None) -> dict:
    """Train per ``cfg`` on this rank; returns the last reported metrics."""
    t = cfg.train
    rank, world = session.rank, session.world
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    if t.engine == "deepspeed":
        if not dist.is_initialized():
            _single_process_group()
        engines.init_distributed("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    method = build_method(cfg.method)
    built = build_modules(cfg, method, device)
    modules, frozen, trackers = built.trainable, built.frozen, built.trackers
    gen_name = method.generator
    ema = EMA(modules[gen_name], t.ema_decay, t.ema_warmup)  # full fp32 weights, before any partitioning
    t0 = time.perf_counter()
    def optim_kind(name: str) -> str:
        return "generator" if name == gen_name else "discriminator" if name == "discriminator" else "critic"

    roles = {n: engines.build_role(n, m, role_train(cfg, optim_kind(n)), cfg.data.batch_size, world, device)
             for n, m in modules.items()}
    timing = {"time/engine_init_s": time.perf_counter() - t0}
    torch.manual_seed(cfg.run.seed * 1000 + rank)  # then per-rank noise and time draws
    stream = build_stream(cfg, method, modules[gen_name], rank, world)
    counters = StepCounters()

    with restore_source(session, t, paths) as (path, where):
        state = None
        if path is not None:
            state, timing["time/restore_s"], changed = ckpt.restore(path, roles)
    if state is not None:
        ema.load_state_dict(state["ema"])
        for name, (tracker, _source) in trackers.items():
            tracker.load_state_dict(state["frozen_ema"][name])
        counters = StepCounters(**state["counters"])
        stream.load_state_dict(state["data"][min(rank, len(state["data"]) - 1)])
        ckpt.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        timing["restored_at_step"] = counters.step
        if rank == 0:
            print(f"[hyperscale] resumed at step {counters.step} from {where}", flush=True)
            if changed:
                print(f"[hyperscale] this run's optimizer settings replace the checkpoint's: {'; '.join(changed)}",
                      flush=True)

    def next_batch() -> Batch:
        return draw_batch(stream, modules[gen_name], device)

    def save_checkpoint(step: int, metrics: dict) -> float:
        """Every rank writes its shards into its own temp dir and reports it; Ray merges them."""
        t_save = time.perf_counter()
        local = {"data": stream.state_dict(), "rng": ckpt.rng_state()}  # per-rank cursors and RNG streams
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        state = {"roles": {n: r.state_dict() for n, r in roles.items()}, "ema": ema.state_dict(),
                 "frozen_ema": {n: tr.state_dict() for n, (tr, _source) in trackers.items()},
                 "counters": counters.__dict__.copy(), "data": [g["data"] for g in gathered],
                 "rng": [g["rng"] for g in gathered]} if rank == 0 else None
        meta = {"step": step, "samples": counters.samples * world, "world_size": world, "run_id": paths.run_id}
        with tempfile.TemporaryDirectory(prefix="hs-ckpt-") as tmp:
            d = ckpt.write_rank(Path(tmp) / f"step_{step:08d}", rank, roles.values(), state, meta, cfg_yaml)
            if world > 1:
                dist.barrier()  # every rank's files are complete before any rank reports
            session.report(metrics, d)
        return time.perf_counter() - t_save

    def quality(step: int) -> dict:
        """The evaluator's metrics on the EMA generator (rank 0 computes, every rank gets them)."""
        out = [None]
        if rank == 0:
            model = ema.model.eval()
            out = [evaluate(lambda z, cond: method.sample(model, z.to(device), cond.to(device)), step, model)]
        if world > 1:
            dist.broadcast_object_list(out, src=0)
        return out[0]

    def rank0_says(flag: bool) -> bool:
        """Rank 0's answer, for every rank (decisions on rank 0's clock)."""
        out = [flag]
        if world > 1:
            dist.broadcast_object_list(out, src=0)
        return out[0]

    def out_of_time() -> bool:
        """``train.max_minutes`` spent?"""
        return rank0_says(time.time() - t_start > 60 * t.max_minutes)

    def checkpoint_due() -> bool:
        """``train.checkpoint_every_minutes`` passed since the last checkpoint (or the start)?"""
        return t.checkpoint_every_minutes > 0 and rank0_says(time.time() - t_ckpt >= 60 * t.checkpoint_every_minutes)

    def stop_now() -> str | None:
        """Collective: a stop signal any rank has seen (the driver's, a drained node)."""
        return preemption.agree(stop_requested(), device) if stop_requested is not None else None

    stop_requested = getattr(session, "stop_requested", None)
    cfg_yaml = to_yaml(cfg)
    t_start, step0, s0 = time.time(), counters.step, counters.samples
    t_ckpt = t_start
    # what a run resumed at (or past) max_steps reports: where it stands, no new losses
    metrics: dict = timing | {"step": counters.step, "samples": counters.samples * world}
    while counters.step < t.max_steps:
        method.set_global_step(counters.step)  # stage schedules (TSCD's 8 -> 4 -> 2 -> 1 segments)
        metrics = two_player_step(method, next_batch, roles, frozen, ema, counters)
        for tracker, source in trackers.values():
            with roles[source].full_params() as full:
                tracker.update(full)
        step = counters.step
        session.step_done(step)
        # the clock is consulted at logged steps only: a broadcast per step would sync every rank
        stop = stop_now() if step < t.max_steps else None  # the last step ends the run anyway
        is_ckpt = (step % t.checkpoint_every == 0 or step == t.max_steps or stop is not None
                   or (step % t.log_every == 0 and checkpoint_due()))
        is_eval = evaluate is not None and t.eval_every > 0 and (step % t.eval_every == 0 or step == t.max_steps)
        if stop is not None:
            metrics["stopped_by"] = stop
        if step % t.log_every == 0 or is_ckpt or is_eval:
            elapsed = time.time() - t_start
            sps = (counters.samples - s0) * world / max(elapsed, 1e-9)
            eta = (t.max_steps - step) * elapsed / max(1, step - step0)
            metrics |= timing | {"step": step, "samples": counters.samples * world, "samples_per_s": sps}
            if is_eval:
                metrics |= quality(step)
            if rank == 0:
                from hyperscale.progress import training_step  # draws here, or sends to Ray's driver

                training_step(step, t.max_steps, metrics, sps, eta)
        if is_ckpt:
            timing["time/checkpoint_save_s"] = save_checkpoint(step, metrics)
            t_ckpt = time.time()
        elif step % t.log_every == 0 or is_eval:
            session.report(metrics)
        if stop is not None:  # checkpointed just above; a resume continues from exactly here
            if rank == 0:
                print(f"[hyperscale] {stop}: checkpoint at step {step}, stopping", flush=True)
            if world > 1:
                dist.barrier()
            if stop == preemption.DRAIN:  # Ray Train restarts the worker group from that checkpoint
                raise preemption.NodePreempted(f"node of this run drained at step {step}: checkpointed")
            return metrics  # no export: the resumed run exports at its end
        if t.max_minutes > 0 and step % t.log_every == 0 and step < t.max_steps and out_of_time():
            if not is_ckpt:  # a resume continues from exactly here
                timing["time/checkpoint_save_s"] = save_checkpoint(step, metrics)
            if rank == 0:
                print(f"[hyperscale] train.max_minutes={t.max_minutes:g} spent at step {step}: exporting", flush=True)
            break

    export(method, roles[gen_name], ema, cfg, counters.step, paths.export_dir, rank, metrics)
    if world > 1:
        dist.barrier()
    return metrics
