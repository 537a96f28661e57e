"""Run a sweep: Ray Tune over trial configurations, ASHA early stopping on the quality metric
(or FIFO: every trial to the end), resumable after an interruption; then the table, the plot
and the best preset (``hyperscale.tune.report``)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ray.tune import Callback

from hyperscale.progress import Progress
from hyperscale.storage.local import atomic_file

from hyperscale.train.launch import ensure_ray, resolve_paths
from hyperscale.tune.space import SweepConfig, base_tree, check_space, grid_size, param_space, trial_config
from hyperscale.tune.trial import tune_trial


def make_scheduler(sweep: SweepConfig, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.name == "fifo":
        return FIFOScheduler()
    # time_attr "step": rungs are training steps (grace_period, x reduction_factor, ...), not
    # report counts, so they mean the same whatever eval.every is.
    return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=sweep.scheduler.grace_period,
                         reduction_factor=sweep.scheduler.reduction_factor)


def run_sweep(sweep: SweepConfig, base: Path, evaluator, resume: bool = False, log=print):
    """Run (or resume) the sweep; returns (Tune ResultGrid, experiment dir, base config tree, the
    ids of the trials that ended)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tree = base_tree(sweep, base)
    check_space(sweep, tree)  # a bad search value fails here, not in trial 5
    # Trials run in their own directories (Tune's working dir): give them absolute paths.
    resolved = resolve_paths(trial_config(tree, {})).model_dump(mode="json")
    max_steps = trial_config(tree, {}).train.max_steps
    if sweep.scheduler.name == "asha" and sweep.scheduler.grace_period > max_steps:
        raise ValueError(f"scheduler.grace_period={sweep.scheduler.grace_period} exceeds the trials' "
                         f"train.max_steps={max_steps}: ASHA could never stop a trial")
    out = Path(sweep.output_dir).expanduser().resolve()
    exp_dir = out / sweep.name
    if not resume and exp_dir.exists() and any(exp_dir.iterdir()):
        raise FileExistsError(f"{exp_dir} holds an earlier sweep: pass --resume to continue it, or choose "
                              f"another output_dir/name")
    cpus = sweep.trial.cpus * sweep.max_concurrent_trials
    ensure_ray(int(max(os.cpu_count() or 1, cpus)), str(exp_dir))  # Ray's logs: <experiment>/logs
    ended = EndedTrials(exp_dir / "ended_trials.json")
    n = sweep.num_samples * grid_size(sweep)
    console = SweepConsole(sweep.name, n, max_steps, sweep.metric, sweep.mode)

    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, base_tree=resolved, evaluator=evaluator, metric=sweep.metric,
                             cpus=sweep.trial.cpus, gpus=sweep.trial.gpus),
        {"CPU": sweep.trial.cpus, "GPU": sweep.trial.gpus})
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        log(f"[sweep] resuming {exp_dir}")
        # runs the callbacks pickled with its state: their SweepConsole draws again (see __setstate__)
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    else:
        points = [{"params": p} for p in sweep.points_to_evaluate]
        log(f"[sweep] {sweep.name}: {n} trials ({sweep.scheduler.name}), {sweep.max_concurrent_trials} at a time, "
            f"{max_steps} steps max, {sweep.metric} ({sweep.mode}) every {sweep.eval.every} steps")
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep) | {"eval_every": sweep.eval.every},
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                scheduler=make_scheduler(sweep, max_steps),
                # max_concurrent here: Tune ignores TuneConfig.max_concurrent_trials for a search generator
                search_alg=BasicVariantGenerator(points_to_evaluate=points or None, random_state=sweep.seed,
                                                 max_concurrent=sweep.max_concurrent_trials)),
            # verbose=0: no status tables; SweepConsole is the one display
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=str(out), verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0), callbacks=[ended, console]),
        )
    # Tune prints its experiment box and TensorBoard hint even at verbose=0: what Tune prints goes
    # to <experiment>/logs/tune.log (SweepConsole draws on the stream it was made with)
    (exp_dir / "logs").mkdir(parents=True, exist_ok=True)
    try:
        with open(exp_dir / "logs" / "tune.log", "a") as tune_log, contextlib.redirect_stdout(tune_log):
            results = tuner.fit()
    finally:
        SweepConsole.close_all()
    # read back from the file: a restored Tuner runs the callback instance pickled with its state
    return results, exp_dir, tree, EndedTrials(ended.path).ended


def collect_rows(results, metric: str, max_steps: int) -> list[dict]:
    """Plain trial rows (``hyperscale.tune.report``) from a Tune ResultGrid."""
    rows = []
    for result in results:
        df = result.metrics_dataframe
        history = []
        if df is not None and metric in df and "step" in df:
            history = [(int(s), float(m)) for s, m in zip(df["step"], df[metric])]
        steps = history[-1][0] if history else 0
        rows.append({"trial": (result.metrics or {}).get("trial_id") or Path(result.path).name,
                     "overrides": dict(result.config["params"]), "history": history, "steps": steps,
                     "stopped_early": result.error is None and steps < max_steps,
                     "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"})
    return rows


def write_best_preset(tree: dict, params: dict, path: Path, sweep_name: str) -> Path:
    """The best trial's configuration as a ready-to-run distill preset (the base preset's
    settings, its number of workers included, with the trial's values)."""
    from hyperscale.config import to_yaml
    from hyperscale.storage.local import atomic_file

    cfg = trial_config(tree, params)
    cfg.run = cfg.run.model_copy(update={"name": f"{sweep_name}-best", "output_dir": f"runs/{sweep_name}-best"})
    header = "".join(f"#   {k}: {v!r}\n" for k, v in params.items())
    with atomic_file(path) as tmp:
        tmp.write_text(f"# Best trial of sweep '{sweep_name}' (written by jobs/sweep.py); its search values:\n"
                       f"{header}{to_yaml(cfg)}")
    return path


class EndedTrials(Callback):
    """Notes (in ``<experiment>/ended_trials.json``, kept across resumes) every trial that ended:
    finished, stopped by the scheduler, or failed. After an interruption (Ctrl+C / SIGINT) Tune
    returns its running trials as terminated, but they never ended, so they are missing here."""

    def __init__(self, path: Path):
        self.path = path
        self.ended: set[str] = set(json.loads(path.read_text())) if path.is_file() else set()

    def _add(self, trial) -> None:
        self.ended.add(trial.trial_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(sorted(self.ended)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._add(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._add(trial)


class SweepConsole(Callback):
    """The sweep's one progress display (on the driver, where Tune runs its callbacks): work in
    trial steps, a trial that ended (finished, stopped early or failed) counting in full, so the
    ETA shrinks as ASHA stops trials; trials ended / running and the best metric so far."""

    live: list["SweepConsole"] = []

    def __init__(self, name: str, trials: int, max_steps: int, metric: str, mode: str):
        self.name, self.trials, self.max_steps, self.metric, self.mode = name, trials, max_steps, metric, mode
        self.best: float | None = None
        self._open()

    def _open(self) -> None:
        self.display = Progress(self.trials * self.max_steps, self.name, "trial-steps", min_interval=15.0)
        SweepConsole.live.append(self)

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
        return {k: v for k, v in self.__dict__.items() if k != "display"}

    def __setstate__(self, state: dict) -> None:  # a restored sweep (--resume): this run's display
        self.__dict__.update(state)
        self._open()

    @classmethod
    def close_all(cls) -> None:
        while cls.live:
            cls.live.pop().close()

    def _show(self, trials, force: bool = False, ended=None, reporting=None) -> None:
        """``ended``: the trial whose end this is (Tune calls back before it marks the trial so);
        ``reporting``: (trial, its new result), which Tune records after the callback."""
        if self.display is None:
            return
        finished = {"TERMINATED", "ERROR"}
        is_over = lambda t: t is ended or t.status in finished  # noqa: E731
        last = lambda t: reporting[1] if reporting and t is reporting[0] else (t.last_result or {})  # noqa: E731
        done = sum(self.max_steps if is_over(t) else int(last(t).get("step", 0)) for t in trials)
        for t in trials:
            value = last(t).get(self.metric)
            if value is not None and (self.best is None or (value < self.best if self.mode == "min" else value > self.best)):
                self.best = float(value)
        fields = {"trials ended": f"{sum(map(is_over, trials))}/{self.trials}",
                  "running": sum(t.status == "RUNNING" and not is_over(t) for t in trials),
                  f"best {self.metric}": self.best}
        self.display.set(done, fields, force=force)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trials, reporting=(trial, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials, force=True, ended=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials, force=True, ended=trial)

    def on_step_end(self, iteration, trials, **info):
        if self.display is not None:
            self.display.tick()

    def close(self) -> None:
        if self.display is not None:
            self.display.close()


def interrupted(results, ended: set[str]) -> bool:
    """True when the sweep stopped before every trial ended (Tune saved the experiment state;
    ``--resume`` continues it)."""
    return any(r.metrics is None or r.metrics.get("trial_id") not in ended for r in results)
