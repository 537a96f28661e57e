"""Preemption-safe runs (hyperscale/train/preemption.py) through the real jobs: SIGTERM to the
driver of a Ray Train run makes the workers checkpoint at their next step, the job exits 143
with one line naming the checkpoint and the resume command, and ``resume_from_checkpoint=latest``
ends bit-identical to an uninterrupted run; a checkpoint that cannot come within
``train.preemption_grace_seconds`` does not hold the exit up; without Ray the same signal
checkpoints the in-process loop. (SIGINT on a Ray run: tests/integration/train/test_console.py.)

As in test_reliability, the harness (hyperscale.bench.reliability) injects the signal; these tests
read what the runs left behind (exit codes, checkpoints' meta.json, the console, the exports)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hyperscale.bench import reliability
from hyperscale.storage.local import REPO
from hyperscale.train.checkpoint import find_latest, meta_step, problems

STEP = re.compile(r"\b(\d+)/(\d+) steps \(")


def _checkpoint_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(meta_step(m.parent) for m in root.glob("*/meta.json") if not problems(m.parent))


def test_sigterm_to_the_driver_checkpoints_at_the_next_step_exits_143_and_resumes_exactly(tmp_path):
    steps = 30
    row = reliability.sigterm_driver(tmp_path, steps=steps)
    console, run = row["_console"], tmp_path / "signalled"
    assert row["_rc"] == 143, console[-4000:]
    # the only checkpoint before the resume is the signal's: steps every 1000, the clock's every 5 min
    at = row["_at"]
    latest = row["_latest"]
    assert latest is not None, console[-4000:]
    k = meta_step(latest)
    assert at <= k < steps and k == row["_done"], (at, k, row["_done"])  # nothing trained past it
    assert "Traceback" not in console, console[-4000:]
    last = console.strip().splitlines()[-1]
    # "with a checkpoint" only when it landed before the grace period ended (else: "no checkpoint within")
    m = re.fullmatch(r"\[hyperscale\] SIGTERM: stopped at step (\d+) with a checkpoint \((.+)\), [\d.]+ s after the "
                     r"signal; continue from its checkpoint at step (\d+) with: python .*jobs/pretrain_teacher.py .*"
                     r"train.resume_from_checkpoint=latest", last)
    assert m and int(m.group(1)) == int(m.group(3)) == k and Path(m.group(2)) == latest, last
    # the resume continued from that checkpoint to the end ...
    assert f"resumed at step {k} from" in row["_resume_log"]
    assert _checkpoint_steps(run) == [k, steps]
    # ... bit-identical to the run nobody stopped
    for kind in ("raw", "ema"):
        a, b = (load_file(str(d / "export" / kind / "model.safetensors")) for d in (run, tmp_path / "straight"))
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[n], b[n]) for n in a), kind


def _job(out: Path, *overrides: str, no_ray: bool = False) -> tuple[subprocess.Popen, Path]:
    log = out.parent / f"{out.name}.console.txt"
    cmd = [sys.executable, str(REPO / "jobs/pretrain_teacher.py"), "--config", str(REPO / "jobs/configs/teacher-tiny.yaml"),
           f"run.output_dir={out}", "train.max_steps=100000", "train.checkpoint_every=100000", "train.log_every=1",
           *(["--no-ray", "train.num_workers=1", "train.engine=torch"] if no_ray else []), *overrides]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"},
                                start_new_session=True)
    return proc, log


def _signal_after_progress(proc: subprocess.Popen, log: Path, sig: int, timeout: float = 300) -> int:
    """Wait for a progress line past step 2, send ``sig`` to the job's process, return its exit code."""
    try:
        deadline = time.monotonic() + timeout
        while max((int(s) for s, _ in STEP.findall(log.read_text())), default=0) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no progress within {timeout:.0f} s"
            time.sleep(0.2)
        proc.send_signal(sig)
        return proc.wait(180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # this test's own job only
            proc.wait()


def test_a_checkpoint_that_cannot_come_within_the_grace_period_does_not_hold_the_exit(tmp_path):
    # 0.01 s: less than one step and one checkpoint take, so the driver must give up waiting
    proc, log = _job(tmp_path / "run", "train.preemption_grace_seconds=0.01")
    rc = _signal_after_progress(proc, log, signal.SIGTERM)
    console = log.read_text()
    assert rc == 143, console[-3000:]
    last = console.strip().splitlines()[-1]
    assert re.fullmatch(r"\[hyperscale\] SIGTERM: no checkpoint within train.preemption_grace_seconds=0.01 s; "
                        r"(no checkpoint yet \(one every 100000 steps\); start again|continue from its checkpoint "
                        r"at step \d+) with: python .*train.resume_from_checkpoint=latest", last), last


def test_sigterm_without_ray_checkpoints_the_in_process_loop(tmp_path):
    proc, log = _job(tmp_path / "run", no_ray=True)
    rc = _signal_after_progress(proc, log, signal.SIGTERM)
    console = log.read_text()
    assert rc == 143, console[-3000:]
    latest = find_latest(tmp_path / "run/checkpoints")
    assert latest is not None and meta_step(latest) >= 2, console[-3000:]
    assert f"SIGTERM: stopped at step {meta_step(latest)} with a checkpoint ({latest})" in console, console[-3000:]
    assert not (tmp_path / "run/export").exists()  # a stopped run does not export; its resume will


def test_a_drained_node_checkpoints_at_the_next_step_then_raises_for_a_restart(tmp_path):
    """Ray Train's drain mark (a node about to be preempted) on a rank: the loop checkpoints at
    that step and raises, because a normal return during a drain would end the run as finished
    instead of restarting the worker group from the checkpoint. In process, with the loop's
    session saying what a Ray worker's StopPoller would."""
    import pytest

    from hyperscale.config import load_config
    from hyperscale.train import preemption
    from hyperscale.train.launch import prepare_run
    from hyperscale.train.local import LocalSession
    from hyperscale.train.loop import Paths, run

    class Drained(LocalSession):
        def __init__(self, *a, at: int):
            super().__init__(*a)
            self.at, self.steps = at, 0

        def step_done(self, step: int) -> None:
            self.steps = step

        def stop_requested(self):
            return preemption.DRAIN if self.steps >= self.at else None

    threads = torch.get_num_threads()
    try:
        cfg, out = prepare_run(load_config(REPO / "jobs/configs/teacher-tiny.yaml", [
            f"run.output_dir={tmp_path}", "train.num_workers=1", "train.engine=torch", "train.max_steps=6",
            "train.checkpoint_every=1000", "train.log_every=1", "data.batch_size=4"]))
        root = Path(out) / "checkpoints"
        with pytest.raises(preemption.NodePreempted, match="drained at step 2"):
            run(cfg, Drained(root, 2, at=2), Paths(root, Path(out) / "export"), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert _checkpoint_steps(tmp_path) == [2]
    assert not (tmp_path / "export").exists()


def test_the_drivers_helper_actors_are_pinned_to_the_drivers_node(ray_cluster):
    """The stop flag and the console queue are placed on the driver's node by a hard node affinity,
    so that losing a worker node mid-run cannot take them along (tests/integration/cluster covers the
    node loss itself); both answer from there."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from hyperscale.train.console import DriverConsole
    from hyperscale.train.preemption import on_driver_node, stop_flag

    ray = ray_cluster
    here = ray.get_runtime_context().get_node_id()
    opts = on_driver_node()
    strategy = opts["scheduling_strategy"]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy) and strategy.node_id == here and not strategy.soft
    assert opts["num_cpus"] == 0
    flag = stop_flag()
    flag.set.remote("test")
    assert ray.get(flag.get.remote()) == "test"
    console = DriverConsole("t")
    console.queue.put("x")
    assert console.queue.get(timeout=10) == "x"
    # the GCS actor table (Ray's state API needs the dashboard, which the test cluster does not run)
    table = ray._private.state.actors()
    for handle in (flag, console.queue.actor):
        info = table[handle._actor_id.hex()]
        assert info["State"] == "ALIVE" and info["Address"]["NodeID"] == here
    ray.kill(flag)
    ray.kill(console.queue.actor)
