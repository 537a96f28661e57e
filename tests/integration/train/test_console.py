"""The console a person reads: one progress display per job, no Ray noise, no line twice, an
ETA, errors in full, a readable Ctrl+C, and Ray's full logs kept in the run directory."""
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hyperscale.storage.local import REPO
from hyperscale.progress import (ConsoleSink, Progress, eta_seconds, format_duration, format_line, progress,
                                 training_fields)

ROOT = REPO  # the repository root

# What Ray, Ray Train and DeepSpeed printed on the console of a distill run before (each seen there)
NOISE = [r"PlacementGroupCleaner", r"Failed to query Ray Train Controller", r"Reporting training result",
         r"TrainingReport\(", r"\(TrainController pid=", r"\(RayTrainWorker pid=", r"\(pid=\d+\)",
         r"Token authentication is enabled", r"Started a local Ray instance", r"network_util\.cc",
         r"Setting up process group", r"\[W\d{4} ", r"FutureWarning", r"real_accelerator\.py",
         r"\] \[(INFO|WARNING)\] \[", r"INFO worker\.py", r"Received SIGINT"]


# ---------------------------------------------------------------- the formatter

@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"),
                                           (3600 * 2 + 7 * 60, "2h07m"), (86400 + 3 * 3600, "1d03h"),
                                           (None, "--"), (float("inf"), "--"), (float("nan"), "--"), (-1, "--")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_eta_is_the_rest_at_the_average_rate_and_unknown_before_any_progress():
    assert eta_seconds(25, 100, elapsed=10.0) == pytest.approx(30.0)
    assert eta_seconds(100, 100, elapsed=10.0) == 0.0
    assert eta_seconds(0, 100, elapsed=10.0) is None
    assert eta_seconds(5, None, elapsed=10.0) is None


def test_a_progress_line_has_the_count_percentage_eta_rate_and_losses():
    line = format_line("[hyperscale] sim", 120, 1200, unit="steps", elapsed=250, eta=2280,
                       fields={"samples/s": 31.46, "loss/generator": -3.0209, "eval/fid": None}, bar_width=10)
    assert line == ("[hyperscale] sim  [#.........]  120/1200 steps (10%)  ETA 38m00s  elapsed 4m10s  "
                    "31.5 samples/s  loss/generator=-3.021")
    assert format_line("x", 5, 5, elapsed=3).endswith("5/5 (100%)  done  elapsed 3s")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_plain_output_prints_the_first_and_last_update_and_at_most_one_line_per_interval():
    out, clock = io.StringIO(), Clock()
    with Progress(100, "loop", "batches", stream=out, tty=False, min_interval=10, clock=clock) as p:
        for _ in range(100):
            clock.t += 1
            p.update(1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[hyperscale] loop  1/100 batches (1%)  ETA 1m39s  elapsed 1s")
    assert lines[-1].startswith("[hyperscale] loop  100/100 batches (100%)  done  elapsed 1m40s")
    assert 10 <= len(lines) <= 12 and len(set(lines)) == len(lines)
    assert all("\r" not in line for line in lines)


def test_a_terminal_gets_one_redrawn_bar_and_messages_above_it(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    out, clock = io.StringIO(), Clock()
    p = Progress(4, "job", "steps", stream=out, tty=True, clock=clock)
    for i in range(4):
        clock.t += 1
        p.update(1)
        if i == 1:
            p.message("[hyperscale] resumed at step 2")
    p.close()
    text = out.getvalue()
    assert text.count("\n") == 2  # the message's line and the closed bar's
    assert "\r\x1b[K[hyperscale] resumed at step 2\n" in text
    assert "[####################]  4/4 steps (100%)  done" in text.splitlines()[-1]
    assert re.search(r"\[#####\.+\]  1/4 steps \(25%\)  ETA 3s", text)


def test_a_narrow_terminal_keeps_the_count_and_eta_and_cuts_the_values(monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    out = io.StringIO()
    p = Progress(10, "job", "steps", stream=out, tty=True, clock=Clock())
    p.set(5, {"samples/s": 10.0, "loss/generator": 1.0, "loss/fake_score": 2.0}, eta=65)
    drawn = out.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert len(drawn) == 69 and "5/10 steps (50%)  ETA 1m05s" in drawn


def test_the_callers_eta_counts_down_between_updates():
    clock = Clock()
    p = Progress(10, "t", stream=io.StringIO(), tty=False, clock=clock)
    p.set(1, eta=100.0)
    clock.t += 30
    assert p.current_eta() == pytest.approx(70.0)


def test_progress_iterates_with_a_total_from_len():
    out = io.StringIO()
    assert list(progress([1, 2, 3], desc="it", stream=out, tty=False, min_interval=0)) == [1, 2, 3]
    assert "3/3 (100%)  done" in out.getvalue().splitlines()[-1]


def test_the_training_sink_shows_samples_per_s_losses_and_eval_metrics_only():
    fields = training_fields({"loss/generator": 1.5, "eval/fid": 300.0, "lr/generator": 1e-4, "step": 3}, 12.0)
    assert fields == {"samples/s": 12.0, "loss/generator": 1.5, "eval/fid": 300.0}
    out = io.StringIO()
    sink = ConsoleSink("sim", stream=out, tty=False)
    sink.step({"step": 2, "total": 4, "fields": fields, "eta": 5.0})
    sink.step({"step": 4, "total": 4, "fields": fields, "eta": 0.0})
    sink.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "2/4 steps (50%)  ETA 5s" in lines[0] and "4/4 steps (100%)  done" in lines[1]


# ---------------------------------------------------------------- the jobs' consoles

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from hyperscale.config import load_config
    from hyperscale.models.build import build_denoiser, save_denoiser

    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    path = tmp_path_factory.mktemp("console") / "teacher"
    save_denoiser(build_denoiser(cfg.model, cfg.schedule), path)
    return path


def _cmd(out: Path, teacher: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs/distill.py"), "--config", str(ROOT / "jobs/configs/sim-tiny.yaml"),
            f"run.output_dir={out}", f"model.pretrained_teacher_model={teacher}", *overrides]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_TRAIN_ENABLE_PRINT_PATCH")}
    return env | {"PYTHONUNBUFFERED": "1"}


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(re.search(p, line) for p in NOISE)]


def _console_of(out, teacher, *args) -> str:
    """What a distill job that must succeed printed (stdout, then stderr)."""
    p = subprocess.run(_cmd(out, teacher, *args), capture_output=True, text=True, timeout=300, env=_env())
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-4000:]
    return console


def _duplicates(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    return sorted({line for line in lines if lines.count(line) > 1})


def test_a_ray_distill_console_is_one_clean_progress_display_and_the_logs_are_in_the_run_dir(tmp_path, teacher):
    out = tmp_path / "run"
    console = _console_of(out, teacher, "train.max_steps=6", "train.log_every=2", "train.checkpoint_every=6")
    assert _noise(console) == [], console
    assert _duplicates(console) == [], console
    progress_lines = [line for line in console.splitlines() if " steps (" in line]
    assert [re.search(r"(\d+)/6 steps", line).group(1) for line in progress_lines] == ["2", "4", "6"], console
    assert all("samples/s" in line and "loss/generator=" in line for line in progress_lines)
    assert re.search(r"2/6 steps \(33%\)  ETA (\d+s|\d+m\d\ds)", progress_lines[0]), progress_lines[0]
    assert progress_lines[-1].split("steps (100%)")[1].startswith("  done")
    # the line at start says where the logs are, and they are there: the driver's and every Ray process's
    assert f"[hyperscale] logs: {out}/logs" in console.splitlines()[0]
    logs = out / "logs"
    assert "Started a local Ray instance" in (logs / "driver.log").read_text()
    assert (logs / "ray").is_dir() and not (logs / "ray").is_symlink(), "copied out of Ray's temp dir at exit"
    worker_out = "".join(f.read_text(errors="replace") for f in (logs / "ray").glob("worker-*.out"))
    worker_err = "".join(f.read_text(errors="replace") for f in (logs / "ray").glob("worker-*.err"))
    assert "train  6/6 steps (100%)" in worker_out, "rank 0 keeps its own progress lines in its log"
    assert "Reporting training result" in worker_err, "Ray Train's own lines are kept, in the files"


def test_a_failing_worker_shows_its_full_traceback(tmp_path, teacher):
    p = subprocess.run(_cmd(tmp_path / "run", tmp_path / "no-such-teacher", "train.max_failures=0"),
                       capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode != 0
    assert re.search(r"\[hyperscale\] training failed on ranks? [0-9]", p.stderr), p.stderr[-4000:]
    full = p.stderr.split("[hyperscale] training failed on", 1)[1]
    # the worker's whole traceback, innermost frame included (Ray's own snippet cuts the middle)
    assert "in build_modules" in full and "in resolve_source" in full
    assert "FileNotFoundError: model source" in full


def test_ctrl_c_ends_a_ray_run_with_a_checkpoint_and_one_line_that_says_how_to_resume(tmp_path, teacher):
    """SIGINT (Ctrl+C) stops a Ray run as SIGTERM does (hyperscale/train/preemption.py): the workers
    checkpoint at their next step (no step checkpoint is due: every 100000), exit code 130."""
    from hyperscale.train.checkpoint import find_latest, meta_step

    out = tmp_path / "run"
    log = tmp_path / "console.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen(_cmd(out, teacher, "train.max_steps=100000", "train.log_every=2",
                                     "train.checkpoint_every=100000"),
                                stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while " steps (" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no progress within 240 s"
                time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    console = log.read_text()
    assert rc == 130, console[-3000:]
    assert "Traceback" not in console and _noise(console) == [], console
    last = console.splitlines()[-1]
    latest = find_latest(out / "checkpoints")
    assert latest is not None, console[-3000:]
    step = meta_step(latest)
    assert re.fullmatch(rf"\[hyperscale\] SIGINT: stopped at step {step} with a checkpoint \({re.escape(str(latest))}\), "
                        rf"[\d.]+ s after the signal; continue from its checkpoint at step {step} with: python "
                        r".*jobs/distill.py .*train.resume_from_checkpoint=latest", last), last


def test_a_run_without_ray_shows_progress_and_keeps_deepspeed_off_the_console(tmp_path, teacher):
    out = tmp_path / "run"
    console = _console_of(out, teacher, "--no-ray", "train.num_workers=1", "train.max_steps=4")
    # torch's own C++ warning that a network namespace without a resolvable hostname gets at
    # process-group set-up (written to fd 2 by libtorch; no Ray there, nor on a normal host)
    noise = [line for line in _noise(console) if "[c10d] The hostname of the client socket" not in line]
    assert noise == [] and _duplicates(console) == [], console
    assert console.splitlines()[0] == f"[hyperscale] logs: {out}/logs/driver.log"
    assert re.search(r"4/4 steps \(100%\)  done", console), console


def test_the_sweep_display_counts_ended_trials_in_full_and_tracks_the_best_metric(capsys):
    """ASHA stops trials early: their unrun steps are no longer work left, so the ETA shrinks."""
    import pickle
    from types import SimpleNamespace as Trial

    from hyperscale.tune.sweep import SweepConsole

    console = SweepConsole("sweep-x", trials=4, max_steps=10, metric="eval/fid", mode="min")
    trials = [Trial(status="RUNNING", last_result={"step": 2, "eval/fid": 300.0}),
              Trial(status="RUNNING", last_result={"step": 4, "eval/fid": 250.0}),  # stopped early, being ended
              Trial(status="PENDING", last_result={}), Trial(status="PENDING", last_result=None)]
    console.on_trial_complete(0, trials, trials[1])
    line = capsys.readouterr().out.strip()
    assert "12/40 trial-steps (30%)" in line and "trials ended=1/4" in line and "running=1" in line
    assert "best eval/fid=250" in line and "ETA" in line
    restored = pickle.loads(pickle.dumps(console))  # Tune restores its callbacks on --resume
    assert restored.display is not console.display and restored.best == 250.0
    SweepConsole.close_all()


def test_the_resume_hint_continues_from_the_runs_own_checkpoint():
    """A job that started from another run's checkpoint and was stopped after writing its own is told
    to resume from ``latest`` (its own), not sent back to the checkpoint it started from; without a
    checkpoint of its own the command keeps what it was given."""
    from hyperscale.train.console import resume_command

    start = ["jobs/distill.py", "--config", "c.yaml", "train.resume_from_checkpoint=runs/a/checkpoints/x",
             "run.output_dir=runs/b"]
    assert resume_command(start, own_checkpoint=True) == (
        "python jobs/distill.py --config c.yaml run.output_dir=runs/b train.resume_from_checkpoint=latest")
    assert resume_command(start) == "python " + " ".join(start)
    fresh = ["jobs/distill.py", "--config", "c.yaml"]
    assert resume_command(fresh) == resume_command(fresh, own_checkpoint=True) == (
        "python jobs/distill.py --config c.yaml train.resume_from_checkpoint=latest")
