"""What Ray Train runs in every worker process: the training loop of
``hyperscale.train.loop`` under a Ray Train session.

Everything arrives through ``train_loop_config`` (the resolved config tree as a dict and the
run's paths); nothing comes from module globals.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import ray.train
import torch

from hyperscale.config import from_dict
from hyperscale.train.loop import Paths, run


class RaySession:
    """The loop's session on a Ray library's report/checkpoint API: ``ray.train`` in a Ray
    Train worker (the default; rank and world from its context), ``ray.tune`` in a trial."""

    def __init__(self, api=ray.train, rank: int | None = None, world: int | None = None) -> None:
        self.api = api
        if rank is None:
            ctx = ray.train.get_context()
            rank, world = ctx.get_world_rank(), ctx.get_world_size()
        self.rank, self.world = rank, world

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        restored = self.api.get_checkpoint()
        with (restored.as_directory() if restored is not None else nullcontext(None)) as d:
            yield Path(d) if d is not None else None

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        checkpoint = self.api.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self.api.report(metrics, checkpoint=checkpoint)


def train_loop(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    paths = Paths(Path(loop_config["run_root"]), Path(loop_config["export_dir"]), loop_config.get("run_id"))
    run(cfg, RaySession(), paths, device)
