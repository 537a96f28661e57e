"""One Tune trial: a real distillation through the project's training loop, reporting a quick
quality evaluation every ``eval.every`` steps so the scheduler can stop it early.

Why trials run the loop directly, as one worker, instead of a Ray Train ``TorchTrainer``
inside each trial: on a small machine Train V2 inside Tune hangs — the first trial's worker
placement group is never released and the next trial's waits forever (docs/stack.md §4, Ray
issue #54305). A function trial that *is* the worker has one resource request
(``trial.cpus`` / ``trial.gpus``), released when the function returns, so trials pack onto
any cluster: on 2 CPUs two 1-CPU trials run side by side; on a GPU cluster each trial takes
one GPU and Tune spreads trials over the nodes. Sweeps explore many small configurations, so
one worker per trial is also where the compute is best spent; the chosen configuration is
then trained data parallel with ``jobs/distill.py`` (the best preset this sweep writes).
"""
from __future__ import annotations

from pathlib import Path

import ray.tune
import torch

from hyperscale.train.loop import Paths, run
from hyperscale.train.worker import RaySession
from hyperscale.tune.space import trial_config


class TuneSession(RaySession):
    """The loop's session in a Tune trial: rank 0 of 1; ``ray.tune`` reports and checkpoints."""

    def __init__(self, metric: str):
        super().__init__(ray.tune, rank=0, world=1)
        self.metric = metric

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        if self.metric not in metrics:  # Tune (and ASHA) want the metric in every result
            raise RuntimeError(f"trial report without the sweep metric {self.metric!r}: "
                               f"evaluation and checkpoint steps must coincide")
        super().report(metrics, checkpoint_dir)


def tune_trial(config: dict, *, base_tree: dict, evaluator, metric: str, cpus: float, gpus: float) -> None:
    """The trainable: ``config["params"]`` holds this trial's dotted-key values."""
    every = config["eval_every"]
    cfg = trial_config(base_tree, config["params"])
    t = cfg.train
    # One worker that reports at every evaluation: checkpoints and logs on the same steps.
    cfg.train = t.model_copy(update={"num_workers": 1, "cpus_per_worker": max(1.0, cpus), "use_gpu": gpus > 0,
                                     "eval_every": every, "checkpoint_every": every, "log_every": every,
                                     "resume_from_checkpoint": None})
    trial_dir = Path(ray.tune.get_context().get_trial_dir())
    cfg.run = cfg.run.model_copy(update={"output_dir": str(trial_dir)})
    device = torch.device("cuda") if gpus > 0 else torch.device("cpu")
    run(cfg, TuneSession(metric), Paths(trial_dir / "checkpoints", trial_dir / "export"), device,
        evaluate=evaluator)
