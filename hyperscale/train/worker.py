"""What Ray Train runs in every worker process: the training loop of
``hyperscale.train.loop`` under a Ray Train session.

Everything arrives through ``train_loop_config`` (the resolved config tree as a dict and the
run's paths); nothing comes from module globals.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import ray.train
import torch

from hyperscale.config import from_dict
from hyperscale.train.loop import Paths, run


# Fault injection (the reliability suite, hyperscale/bench/reliability.py): with this set, each
# worker writes its PID to <dir>/rank<r>.pid when it starts and its last finished step to
# <dir>/rank<r>.step, so a test can kill it by PID and count the steps lost; and appends where it
# runs (Ray node id and address, PID) as one JSON line to <dir>/rank<r>.nodes at every start, so
# a test can see which node each rank ran on before and after a restart.
WATCH_DIR_ENV = "HYPERSCALE_TEST_PID_DIR"


class RaySession:
    """The loop's session on a Ray library's report/checkpoint API: ``ray.train`` in a Ray
    Train worker (the default; rank and world from its context), ``ray.tune`` in a trial.
    ``watch_dir``: where to leave the PID and the last finished step (fault injection).
    ``stop_flag``: the driver's StopFlag actor (hyperscale/train/preemption.py); a Ray Train
    worker also stops for a drained node."""

    def __init__(self, api=ray.train, rank: int | None = None, world: int | None = None,
                 watch_dir: str | None = None, stop_flag=None) -> None:
        from hyperscale.train.preemption import StopPoller

        self.api = api
        self.poller = StopPoller(stop_flag, watch_drain=api is ray.train)
        if rank is None:
            ctx = ray.train.get_context()
            rank, world = ctx.get_world_rank(), ctx.get_world_size()
        self.rank, self.world = rank, world
        self.watch_dir = Path(watch_dir) if watch_dir else None
        if self.watch_dir is not None:
            (self.watch_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
            where = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                     "pid": os.getpid()}
            with open(self.watch_dir / f"rank{rank}.nodes", "a") as f:
                f.write(json.dumps(where) + "\n")

    def step_done(self, step: int) -> None:
        if self.watch_dir is not None:
            (self.watch_dir / f"rank{self.rank}.step").write_text(str(step))

    def stop_requested(self) -> str | None:
        return self.poller.poll()

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        restored = self.api.get_checkpoint()
        with (restored.as_directory() if restored is not None else nullcontext(None)) as d:
            yield Path(d) if d is not None else None

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        checkpoint = self.api.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self.api.report(metrics, checkpoint=checkpoint)


def train_loop(loop_config: dict, stop_flag=None) -> None:
    cfg = from_dict(loop_config["config"])
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    paths = Paths(Path(loop_config["run_root"]), Path(loop_config["export_dir"]), loop_config.get("run_id"))
    run(cfg, RaySession(watch_dir=os.environ.get(WATCH_DIR_ENV), stop_flag=stop_flag), paths, device)
