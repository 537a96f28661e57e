"""Golden per-step losses of the tiny presets (torchtitan style): record or recompute them.

    python tests/golden/update.py                 # re-record every tests/golden/<preset>.json
    python tests/golden/update.py cd-tiny ...     # only these presets (the teacher is always trained)
    python tests/golden/update.py --out DIR       # write the JSON files to DIR instead (the test does)

Every run is the in-process one-worker trainer, exactly what ``jobs/distill.py --no-ray`` runs
(``hyperscale.train.launch.run_in_process`` with its ``LocalSession``), on the CPU, with the
preset's own settings except for: ``train.num_workers=1`` (no Ray), ``train.log_every=1`` (every
step is reported), a few steps (``train.max_steps``), one checkpoint at the end, and a scratch
``run.output_dir``. First teacher-tiny is trained from its seed; every distillation preset then
starts from that teacher's ``export/ema``. ``hypersd-pipeline-tiny`` runs its three phases in
process through ``hyperscale.pipeline.run.run_pipeline`` with the same runner.

Recorded per step: every ``loss/*`` metric the loop reports (its session's ``report``). The
loop runs torch on one thread (``train.cpus_per_worker=1``), so a run is deterministic on one
machine; tests/golden/test_golden.py compares with a tolerance for other x86 CPUs (see there).
All runs share this one process (DeepSpeed keeps the world-size-1 process group the first run
makes, and the loop sets torch's thread count), so run it as a script, not inside pytest's process.

Re-record only when a change of the numbers is intended (a fix of the math, a new order of
random draws), and say so in the commit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

TEACHER = "teacher-tiny"
STEPS = {TEACHER: 6, "sim-tiny": 4, "dmd-tiny": 4, "cd-tiny": 4, "hypersd-tiny": 8, "hypersd-feedback-tiny": 4}
PIPELINE = "hypersd-pipeline-tiny"
# per phase of the pipeline: few steps, yet TSCD still visits every stage (2 steps each: 8 -> 4 -> 2 -> 1)
PIPELINE_STEPS = {"tscd": 8, "feedback": 2, "dmd": 2}
PRESETS = [TEACHER, *[p for p in STEPS if p != TEACHER], PIPELINE]
FORMAT = 1


def common(steps: int) -> list[str]:
    return ["train.num_workers=1", "train.log_every=1", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
            "train.use_gpu=false"]


class Recorder:
    """Wraps ``LocalSession.report`` (the --no-ray session): every reported step's loss/* metrics."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __enter__(self) -> "Recorder":
        from hyperscale.train.local import LocalSession

        self._orig = LocalSession.report
        rows = self.rows

        def report(session, metrics, checkpoint_dir=None):
            rows.append({"step": int(metrics["step"])} | {k: float(v) for k, v in sorted(metrics.items())
                                                          if k.startswith("loss/")})
            return self._orig(session, metrics, checkpoint_dir)

        LocalSession.report = report
        return self

    def __exit__(self, *exc) -> None:
        from hyperscale.train.local import LocalSession

        LocalSession.report = self._orig


def run_preset(name: str, work: Path, teacher: Path | None) -> list[dict]:
    from hyperscale.config import load_config
    from hyperscale.train.launch import run_in_process

    overrides = common(STEPS[name]) + [f"run.output_dir={work / name}"]
    if teacher is not None:
        overrides.append(f"model.pretrained_teacher_model={teacher}")
    cfg = load_config(REPO / "jobs" / "configs" / f"{name}.yaml", overrides)
    with Recorder() as rec:
        run_in_process(cfg)
    return rec.rows


def run_pipeline_preset(work: Path, teacher: Path) -> list[dict]:
    from hyperscale.train.launch import run_in_process
    from hyperscale.pipeline.run import load_pipeline, run_pipeline

    overrides = [f"run.output_dir={work / PIPELINE}", f"model.pretrained_teacher_model={teacher}",
                 "train.num_workers=1", "train.log_every=1", "train.use_gpu=false"]
    for phase, steps in PIPELINE_STEPS.items():
        overrides += [f"phases.{phase}.train.max_steps={steps}", f"phases.{phase}.train.checkpoint_every={steps}"]
    pipe = load_pipeline(REPO / "jobs" / "configs" / f"{PIPELINE}.yaml", overrides)
    rows: list[dict] = []

    def runner(cfg):
        with Recorder() as rec:
            metrics = run_in_process(cfg)
        phase = cfg.run.name.rsplit("-", 1)[-1]
        rows.extend({"phase": phase} | r for r in rec.rows)
        return metrics

    run_pipeline(pipe, runner=runner, log=lambda *a: None)
    return rows


def record(names: list[str], work: Path, log=print) -> dict[str, dict]:
    """{preset: golden record} for ``names`` (teacher-tiny is always trained: the others need it)."""
    out = {}
    t0 = time.perf_counter()
    rows = run_preset(TEACHER, work, None)
    teacher = work / TEACHER / "export" / "ema"
    out[TEACHER] = rows
    log(f"[golden] {TEACHER}: {len(rows)} steps, {time.perf_counter() - t0:.1f} s")
    for name in names:
        if name == TEACHER:
            continue
        t0 = time.perf_counter()
        out[name] = run_pipeline_preset(work, teacher) if name == PIPELINE else run_preset(name, work, teacher)
        log(f"[golden] {name}: {len(out[name])} steps, {time.perf_counter() - t0:.1f} s")
    return {n: {"format": FORMAT, "preset": f"jobs/configs/{n}.yaml",
                "steps_run": PIPELINE_STEPS if n == PIPELINE else STEPS[n],
                "teacher": None if n == TEACHER else f"{TEACHER} export/ema, trained as in {TEACHER}.json",
                "losses": rows} for n, rows in out.items() if n in names}


def write(records: dict[str, dict], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rec in records.items():
        # repr-exact floats: json writes the shortest string that reads back to the same float64
        (directory / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="*", help=f"default: all of {', '.join(PRESETS)}")
    p.add_argument("--out", default=str(HERE), help="where the JSON files go (default: tests/golden)")
    a = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = a.presets or PRESETS
    unknown = sorted(set(names) - set(PRESETS))
    if unknown:
        p.error(f"unknown presets {unknown}; known: {PRESETS}")
    with tempfile.TemporaryDirectory(prefix="hs-golden-") as tmp:
        write(record(names, Path(tmp)), Path(a.out))
    print(f"[golden] wrote {', '.join(names)} to {a.out}")


if __name__ == "__main__":
    main()
