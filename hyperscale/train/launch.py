"""Driver side: start (or join) Ray, run a ``TorchTrainer`` over ``worker.train_loop``.

``python jobs/<job>.py`` starts an embedded local Ray; under ``ray job submit``
(RAY_ADDRESS set) the same code joins the cluster.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

from hyperscale.config import Config, to_yaml
from hyperscale.io import absolute_local

# Without this, every ray.train.report() blocks ~2 s (STACK.md §3).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    missing = {k: v for k, v in RAY_ENV.items() if k not in os.environ}
    os.environ.update(missing)
    env = {"env_vars": {k: os.environ[k] for k in RAY_ENV}}
    if os.environ.get("RAY_ADDRESS"):
        # A cluster (e.g. under `ray job submit`): the job's runtime_env may already set these, and
        # Ray refuses to merge a key given twice, so pass only what the job's env lacks.
        ray.init(runtime_env={"env_vars": missing} if missing else None)
    else:
        tmp = tempfile.mkdtemp(prefix="hs-ray-", dir="/tmp")  # short path: unix socket limit
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=tmp,
                 runtime_env=env, log_to_driver=True)


def resolve_paths(cfg: Config) -> Config:
    cfg = cfg.model_copy(deep=True)
    cfg.model.pretrained_teacher_model = absolute_local(cfg.model.pretrained_teacher_model)
    cfg.data.root = absolute_local(cfg.data.root)
    cfg.data.train_shards_path_or_url = absolute_local(cfg.data.train_shards_path_or_url)
    cfg.train.resume_from_checkpoint = absolute_local(cfg.train.resume_from_checkpoint)
    cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser().resolve())
    return cfg


def write_resolved(cfg: Config) -> Path:
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


def run_training(cfg: Config) -> dict:
    """Train per ``cfg``; returns the final metrics. Outputs land in ``cfg.run.output_dir``:
    config.yaml, checkpoints/ (Ray storage), export/ema and export/raw, metrics.json."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hyperscale.train.worker import train_loop

    cfg = resolve_paths(cfg)
    out = write_resolved(cfg)
    t = cfg.train
    ensure_ray(int(max(os.cpu_count() or 1, t.num_workers * t.cpus_per_worker)))
    trainer = TorchTrainer(
        train_loop,
        # run_id: tells a worker-group restart (same id, checkpoints of this call in storage)
        # from a new run in the same output directory.
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_root": str(out / "checkpoints"),
                           "export_dir": str(out / "export"), "run_id": uuid.uuid4().hex},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name="checkpoints", storage_path=str(out),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    return metrics
