"""Driver side: start (or join) Ray, run a ``TorchTrainer`` over ``worker.train_loop``.

``python jobs/<job>.py`` starts an embedded local Ray; under ``ray job submit``
(RAY_ADDRESS set) the same code joins the cluster.

``run.output_dir`` is a local directory or an ``s3://bucket/prefix``. On S3, Ray Train's
storage is that prefix (a pyarrow S3 filesystem on the endpoint and credentials of
``hyperscale.storage.s3``), the driver PUTs config.yaml (first: a store that cannot be
written fails here, before Ray starts) and metrics.json, and the workers upload the export
and read checkpoints back with boto3. The driver's S3 settings given as environment
variables travel to the workers inside the train function, so workers of a Ray cluster
that was started without them (or elsewhere) reach the same store.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from hyperscale.config import Config, to_yaml
from hyperscale.storage.local import absolute_local, is_remote, join, write_text
from hyperscale.train.preemption import (Interrupted, SignalStop, exit_code, hard_exit_timer, run_until_stopped,
                                         stop_flag)

# Without this, every ray.train.report() blocks ~2 s (docs/stack.md §3).
# RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 otherwise makes each print in a worker both a log
# record and a print, so every line came twice (hyperscale/train/console.py).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def ensure_ray(num_cpus: int | None = None, output_dir: str | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) Ray unless this process already did. Its console stays
    the job's: the workers' and actors' output is not copied to it (``log_to_driver=False``), and
    Ray's logs go to ``<output_dir>/logs`` (``hyperscale.train.console``; one line says where)."""
    import ray

    from hyperscale.train.console import fds_to, log_dir, start_ray_logging

    if ray.is_initialized():
        return
    missing = {k: v for k, v in RAY_ENV.items() if k not in os.environ}
    os.environ.update(missing)
    env = {"env_vars": {k: os.environ[k] for k in RAY_ENV}}
    logs = log_dir(output_dir) if output_dir else None
    with fds_to(logs / "driver.log" if logs else None):  # ray.init's own notes and warnings
        if os.environ.get("RAY_ADDRESS"):
            # A cluster (e.g. under `ray job submit`): the job's runtime_env may already set these, and
            # Ray refuses to merge a key given twice, so pass only what the job's env lacks.
            ray.init(runtime_env={"env_vars": missing} if missing else None, log_to_driver=False)
        else:
            tmp = tempfile.mkdtemp(prefix="hs-ray-", dir="/tmp")  # short path: unix socket limit
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=tmp,
                     runtime_env=env, log_to_driver=False)
    start_ray_logging(output_dir, local=not os.environ.get("RAY_ADDRESS"))


def resolve_paths(cfg: Config) -> Config:
    cfg = cfg.model_copy(deep=True)
    cfg.model.pretrained_teacher_model = absolute_local(cfg.model.pretrained_teacher_model)
    cfg.data.root = absolute_local(cfg.data.root)
    cfg.data.train_shards_path_or_url = absolute_local(cfg.data.train_shards_path_or_url)
    cfg.data.prompts = absolute_local(cfg.data.prompts)
    cfg.train.resume_from_checkpoint = absolute_local(cfg.train.resume_from_checkpoint)
    if getattr(cfg.method, "init_student", None):  # read by the workers, whose cwd may differ
        cfg.method.init_student = absolute_local(cfg.method.init_student)
    out = cfg.run.output_dir
    if "://" in out:
        from hyperscale.storage.s3 import parse_s3_url

        try:
            parse_s3_url(out)
        except ValueError as e:
            raise ValueError(f"run.output_dir: {e}; a run directory is local or on S3") from None
        cfg.run.output_dir = out.rstrip("/")
    else:
        cfg.run.output_dir = str(Path(out).expanduser().resolve())
    return cfg


def write_resolved(cfg: Config) -> str:
    """Write config.yaml into the run directory (local or s3://); returns the directory."""
    out = cfg.run.output_dir
    try:
        write_text(join(out, "config.yaml"), to_yaml(cfg))
    except OSError as e:  # S3: no credentials, no bucket, store unreachable (after retries)
        if not is_remote(out):
            raise
        raise type(e)(f"run.output_dir={out} cannot be written: {e}") from e
    return out


def check_earlier_run(cfg: Config) -> None:
    """Refuse to start over an earlier run's checkpoints unless asked to continue it: Ray Train
    restores a run directory's own latest checkpoint whenever one exists (its run-name
    snapshot), so without ``train.resume_from_checkpoint=latest`` a second run there would
    silently resume (or ignore an explicit checkpoint path), not start fresh."""
    from hyperscale.train.checkpoint import find_latest

    resume = cfg.train.resume_from_checkpoint
    if resume == "latest":
        return
    root = join(cfg.run.output_dir, "checkpoints")
    if is_remote(root):
        try:
            earlier = find_latest(root) is not None
        except OSError:  # store unreachable, no bucket or credentials: write_resolved says which
            return
    else:
        earlier = (Path(root) / "checkpoint_manager_snapshot.json").is_file() or find_latest(root) is not None
    if earlier:
        what = "a fresh start" if resume is None else f"train.resume_from_checkpoint={resume}"
        raise ValueError(f"run.output_dir={cfg.run.output_dir} already holds an earlier run's checkpoints, which a "
                         f"new run there would resume (Ray Train) or mix with its own (--no-ray) instead of {what}: "
                         f"pass train.resume_from_checkpoint=latest to continue that run, or choose another "
                         f"run.output_dir")


def prepare_run(cfg: Config) -> tuple[Config, str]:
    """Before either runner starts: paths resolved, an earlier run's checkpoints refused unless
    resumed, config.yaml written. Returns the resolved config and the run directory."""
    cfg = resolve_paths(cfg)
    check_earlier_run(cfg)
    return cfg, write_resolved(cfg)


def write_metrics(out: str, metrics: dict) -> dict:
    write_text(join(out, "metrics.json"), json.dumps(metrics, indent=1, default=float))
    return metrics


def _storage(out: str) -> dict:
    """RunConfig's storage arguments: a local directory, or the s3:// prefix on an explicit
    pyarrow filesystem (Ray's own resolution would miss AWS_ENDPOINT_URL_S3 and credentials
    the controller's and workers' environments lack)."""
    if not is_remote(out):
        return {"storage_path": out}
    from hyperscale.storage.s3 import arrow_filesystem

    return {"storage_path": out[len("s3://"):], "storage_filesystem": arrow_filesystem(out)}


def train_worker(env: dict[str, str], loop_config: dict, console=None, stop_flag=None) -> None:
    """What every Ray Train worker runs (as ``partial(train_worker, env, console=queue,
    stop_flag=flag)``): the driver's S3 settings ``env``, then ``worker.train_loop``, rank 0
    sending its progress to the driver's console (``console.DriverConsole``'s queue), every rank
    watching the driver's stop flag (``preemption.StopFlag``). ``env`` travels inside the
    pickled function, not in ``train_loop_config``, which Ray Train records in its state API."""
    os.environ.update(env)
    from hyperscale.train.console import worker_console
    from hyperscale.train.worker import train_loop

    with worker_console(console):
        train_loop(loop_config, stop_flag)


def stopped(out: str, stop: SignalStop, metrics: dict) -> Interrupted:
    """The :class:`preemption.Interrupted` of a run that a signal ended (``stop``: its
    SignalStop), after metrics.json is written: the checkpoint's step when training stopped
    with one, else None."""
    from hyperscale.train.checkpoint import find_latest

    write_metrics(out, metrics)
    step = int(metrics["step"]) if metrics.get("stopped_by") else None
    latest = find_latest(join(out, "checkpoints")) if step is not None else None
    return Interrupted(stop.reason, step, time.monotonic() - stop.at, stop.grace_s, metrics,
                       checkpoint=None if latest is None else str(latest))


def run_training(cfg: Config) -> dict:
    """Train per ``cfg``; returns the final metrics. Outputs land in ``cfg.run.output_dir``
    (local or s3://): config.yaml, checkpoints/ (Ray storage), export/ema and export/raw,
    samples.png, metrics.json."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hyperscale.storage.s3 import settings_env

    from hyperscale.train.console import DriverConsole

    cfg, out = prepare_run(cfg)
    t = cfg.train
    ensure_ray(int(max(os.cpu_count() or 1, t.num_workers * t.cpus_per_worker)), out)
    console = DriverConsole(cfg.run.name)
    flag = stop_flag()
    trainer = TorchTrainer(
        functools.partial(train_worker, settings_env(), console=console.queue, stop_flag=flag),
        # run_id: tells a worker-group restart (same id, checkpoints of this call in storage)
        # from a new run in the same output directory.
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_root": join(out, "checkpoints"),
                           "export_dir": join(out, "export"), "run_id": uuid.uuid4().hex},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name="checkpoints", **_storage(out),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    print(f"[hyperscale] {cfg.run.name}: {t.max_steps} steps on {t.num_workers} Ray Train worker(s), "
          f"outputs in {out}", flush=True)
    # SIGTERM/SIGINT: the workers checkpoint at their next step and stop (preemption.py); fit()
    # runs in a helper thread, where Ray Train installs no SIGINT handler that aborts the run.
    with SignalStop(t.preemption_grace_seconds, on_first=lambda reason: flag.set.remote(reason)) as stop:
        try:
            with console:
                result = run_until_stopped(trainer.fit, stop)
        except Interrupted:  # the grace period passed, or a second signal: leave now, within bounds
            hard_exit_timer(15, exit_code(stop.reason), "Ray did not shut down within 15 s; exiting")
            raise
        except SystemExit as e:
            # a SystemExit out of fit() (Ray's own signal handlers exit that way when they are the
            # ones installed); say what happened instead (the job scripts print how to continue)
            raise KeyboardInterrupt(f"training interrupted: {cfg.run.name}") from e
    metrics = dict(result.metrics or {})
    if stop.reason is not None and metrics.get("step") != t.max_steps:  # a signal after the end: done
        raise stopped(out, stop, metrics)
    return write_metrics(out, metrics)


def run_in_process(cfg: Config) -> dict:
    """Train per ``cfg`` in this process without Ray (``jobs/distill.py --no-ray``): one worker
    on ``cuda`` (train.use_gpu) or the CPU, the same loop, checkpoints and outputs as
    ``run_training``, in a local ``run.output_dir``. For a single GPU machine without a Ray
    install, or a debugger. DeepSpeed still works here (a world-size-1 process group)."""
    import torch

    from hyperscale.train.console import local_console
    from hyperscale.train.local import LocalSession
    from hyperscale.train.loop import Paths, run

    t = cfg.train
    if t.num_workers != 1:
        raise ValueError(f"train.num_workers={t.num_workers}: a run without Ray has one worker; pass "
                         f"train.num_workers=1 (and scale data.batch_size to keep the global batch)")
    if is_remote(cfg.run.output_dir):
        raise ValueError(f"run.output_dir={cfg.run.output_dir}: a run without Ray writes a local directory")
    if t.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu=true, but torch sees no CUDA device")
    cfg, out = prepare_run(cfg)
    root = Path(out) / "checkpoints"
    device = torch.device("cuda", torch.cuda.current_device()) if t.use_gpu else torch.device("cpu")
    with local_console(cfg.run.name, Path(out) / "logs"), \
            SignalStop(t.preemption_grace_seconds, hard_exit_after_grace=True) as stop:
        metrics = run(cfg, LocalSession(root, t.keep_checkpoints, stop), Paths(root, Path(out) / "export"), device)
    if stop.reason is not None and metrics.get("step") != t.max_steps:
        raise stopped(out, stop, metrics)
    return write_metrics(out, metrics)
