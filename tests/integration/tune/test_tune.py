"""Ray Tune sweeps: the preset format and its errors, a tiny ASHA sweep of real SIM trials end to
end on 2 CPUs (table, plot, best preset, which then runs with jobs/distill.py), and an
interrupted sweep that resumes its trials from their checkpoints."""
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hyperscale.storage.local import REPO
from hyperscale.config import ConfigError, load_config
from hyperscale.models.build import build_denoiser, save_denoiser
from hyperscale.tune.space import base_tree, check_space, grid_size, load_sweep, trial_config

ROOT = REPO  # the repository root
TINY_SWEEP = ROOT / "jobs/configs/sweep-sim-tiny.yaml"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    path = tmp_path_factory.mktemp("tune") / "teacher"
    save_denoiser(build_denoiser(cfg.model, cfg.schedule), path)
    return path


def write_sweep(tmp_path: Path, teacher: Path, **changes) -> Path:
    """The tiny sweep preset with its base made absolute, the tiny teacher, outputs in tmp_path."""
    tree = yaml.safe_load(TINY_SWEEP.read_text())
    tree["base"] = str(ROOT / "jobs/configs" / tree["base"])
    tree["overrides"] = tree["overrides"] + [f"model.pretrained_teacher_model={teacher}"]
    tree["output_dir"] = str(tmp_path / "sweeps")
    tree.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_shipped_sweep_presets_validate():
    for name, method in (("sweep-sim.yaml", "sim"), ("sweep-sim-tiny.yaml", "sim"), ("sweep-tscd.yaml", "tscd")):
        sweep, base = load_sweep(ROOT / "jobs/configs" / name)
        tree = base_tree(sweep, base)
        check_space(sweep, tree)  # every schedule, rank, loss and both lr bounds make valid configs
        assert trial_config(tree, {}).method.name == method
    sweep, base = load_sweep(ROOT / "jobs/configs/sweep-tscd.yaml")
    schedules = sweep.search["method.stages"]["choice"]
    assert [[s["segments"] for s in sched] for sched in schedules] == [[8, 4, 2, 1], [4, 2, 1], [8, 2, 1], [4, 1]]
    cfg = trial_config(base_tree(sweep, base), {"method.stages": schedules[1]})
    assert [s.segments for s in cfg.method.stages] == [4, 2, 1] and cfg.train.max_steps == 200
    sweep, _ = load_sweep(ROOT / "jobs/configs/sweep-sim.yaml")
    assert sweep.num_samples * grid_size(sweep) >= 8 and sweep.scheduler.name == "asha"


@pytest.mark.parametrize("change,message", [
    ({"search": {"method.distance": {"choose": ["l2"]}}}, "search.method.distance: "),
    ({"search": {"train.lr": {"loguniform": [0.0, 1e-3]}}}, "bounds must be > 0"),
    ({"search": {"train.lr": {"uniform": [1e-3, 1e-4]}}}, "low < high"),
    ({"search": {}}, "at least one"),
    ({"points_to_evaluate": [{"train.lr": 1e-4}]}, "not in search"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, teacher, change, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_sweep(write_sweep(tmp_path, teacher, **change))


@pytest.mark.parametrize("search,message", [
    ({"method.distnce": {"choice": ["l2"]}}, r"method\.distnce: unknown key"),
    ({"method.distance": {"choice": ["l2", "l1"]}}, r"search\.method\.distance = 'l1' makes an invalid config"),
    ({"train.max_steps": {"randint": [0, 4]}}, r"search\.train\.max_steps = 0"),
])
def test_search_values_are_checked_against_the_config_before_any_trial(tmp_path, teacher, search, message):
    sweep, base = load_sweep(write_sweep(tmp_path, teacher, search=search))
    with pytest.raises(ConfigError, match=message):
        check_space(sweep, base_tree(sweep, base))


@pytest.mark.timeout(420)  # a Train-in-Tune style hang (docs/stack.md §4) fails here, not at the suite's limit
def test_tiny_asha_sweep_end_to_end_then_the_best_preset_runs(ray_cluster, tmp_path, teacher, monkeypatch, capsys):
    """4 real SIM trials, one at a time (so ASHA's decisions are deterministic: trials reach each
    rung in a fixed order), a 20-sample FID every 2 of 6 steps."""
    main = runpy.run_path(str(ROOT / "jobs/sweep.py"))["main"]
    config = write_sweep(tmp_path, teacher, max_concurrent_trials=1, points_to_evaluate=[
        {"method.distance": "normalized", "method.huber_c": 0.01}])
    report = tmp_path / "report"
    assert main(["--config", str(config), "--report-dir", str(report)]) == 0
    record = json.loads((report / "sweep.json").read_text())
    rows = record["rows"]
    assert record["suite"] == "sweep" and len(rows) == 4
    for row in rows:
        assert set(row) >= {"trial", "overrides", "metric", "steps", "stopped_early"}
        assert row["error"] is None and row["metric"] is not None
        assert row["steps"] == (row["history"][-1][0]) and [s for s, _ in row["history"]] == list(
            range(2, row["steps"] + 1, 2))  # a report at every evaluation, none lost
        assert row["stopped_early"] == (row["steps"] < 6)
    assert [r["overrides"] for r in rows if r["overrides"]["method.distance"] == "normalized"
            and r["overrides"]["method.huber_c"] == 0.01], "the point to evaluate ran"
    metrics = [r["metric"] for r in rows]
    assert metrics == sorted(metrics), "the table is sorted best (lowest FID) first"
    assert sum(r["stopped_early"] for r in rows) >= 1, "ASHA stopped no trial"
    assert record["settings"]["compute"]["steps_run"] == sum(r["steps"] for r in rows) < 4 * 6
    md = (report / "sweep.md").read_text()
    assert md.count("\n") == 2 + 4 and "eval/fid" in md
    assert (report / "sweep.csv").read_text().count("\n") == 5
    assert (report / "sweep_metric_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "best eval/fid" in capsys.readouterr().out

    # The best preset: the finished trial with the lowest last FID, ready for jobs/distill.py.
    best = load_config(report / "best.yaml")
    finished = [r for r in rows if not r["stopped_early"]]
    winner = min(finished, key=lambda r: r["metric"]) if finished else rows[0]
    assert best.method.distance == winner["overrides"]["method.distance"]
    assert best.method.huber_c == pytest.approx(winner["overrides"]["method.huber_c"])
    assert best.train.num_workers == 2 and best.run.name == "sweep-sim-tiny-best"
    out = tmp_path / "rerun"
    monkeypatch.setattr(sys, "argv", ["distill.py", "--config", str(report / "best.yaml"),
                                      f"run.output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2"])
    runpy.run_path(str(ROOT / "jobs/distill.py"), run_name="__main__")
    assert json.loads((out / "metrics.json").read_text())["step"] == 2
    assert (out / "export/ema/model.safetensors").is_file()


def test_an_existing_sweep_needs_resume(tmp_path, teacher):
    from hyperscale.tune.sweep import run_sweep

    sweep, base = load_sweep(write_sweep(tmp_path, teacher))
    (tmp_path / "sweeps" / sweep.name).mkdir(parents=True)
    (tmp_path / "sweeps" / sweep.name / "experiment_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_sweep(sweep, base, evaluator=None)


@pytest.mark.timeout(600)
def test_an_interrupted_sweep_resumes_its_trials_from_their_checkpoints(tmp_path, teacher):
    """SIGINT a running sweep (its own Ray) once a trial has checkpointed; `--resume` then
    finishes every trial, the interrupted ones from their checkpoints."""
    config = write_sweep(tmp_path, teacher, num_samples=2, scheduler={"name": "fifo"},
                         overrides=["train.max_steps=8", f"model.pretrained_teacher_model={teacher}"])
    cmd = [sys.executable, str(ROOT / "jobs/sweep.py"), "--config", str(config), "--report-dir", str(tmp_path / "r")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exp = tmp_path / "sweeps" / "sweep-sim-tiny"
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            # a trial's second checkpoint on disk: Tune has taken in its first by then (SIGINT right
            # after the first could come before Tune registered it, and the resume started over)
            while not list(exp.glob("*/checkpoint_000001")):
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no trial checkpoint within 240 s"
                time.sleep(0.5)
            first.send_signal(signal.SIGINT)  # Tune stops gracefully and saves the experiment state
            first.wait(120)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
    assert not (tmp_path / "r/sweep.json").exists(), "the first run was not interrupted before the end"
    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=480, env=env)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "[sweep] resuming" in log
    # the trials' own results say where they restored (worker log lines can be lost under load)
    restored = [json.loads(line).get("restored_at_step") for f in exp.glob("*/result.json")
                for line in f.read_text().splitlines() if line.strip()]
    assert any(r and r > 0 for r in restored), restored
    rows = json.loads((tmp_path / "r/sweep.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["steps"] == 8 and r["error"] is None for r in rows)
    # every evaluation of every trial is in the history exactly once across the two runs
    assert all([s for s, _ in r["history"]] == [2, 4, 6, 8] for r in rows), [r["history"] for r in rows]


def test_report_shows_tscd_stage_lists_compactly():
    from hyperscale.tune.report import markdown

    row = {"trial": "t0", "overrides": {"method.stages": [{"segments": 8, "steps": 70}, {"segments": 1, "steps": 60}],
                                         "train.lr": 0.00086113}, "metric": 1601.0, "best_metric": 551.2,
           "steps": 200, "stopped_early": False, "history": [], "error": None}
    table = markdown([row], "eval/fid")
    assert "| 8seg x 70 > 1seg x 60 | 0.0008611 | 1601 |" in table
