"""The real cluster path: `ray start --head` (own ports, own temp dir), `ray job submit -- python
jobs/distill.py --config <tiny preset>` with the real CLI, wait for SUCCEEDED, check the outputs,
and stop only that cluster (its `ray start --block` process, by PID)."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hyperscale.bench.ray_cluster import wait_for_dashboard
from hyperscale.storage.local import REPO
from hyperscale.config import load_config
from hyperscale.models.build import build_denoiser, save_denoiser
from hyperscale.models.generator import load_generator

ROOT = REPO  # the repository root
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Its own Ray head (``ray start --head --block``, own ports and temp dir, token auth on as on
    a real cluster); yields (dashboard address, env for the CLI); stops only that head, by PID."""
    logs = tmp_path_factory.mktemp("head")
    temp_dir = tempfile.mkdtemp(prefix="hs-sub-", dir="/tmp")  # short: unix socket path limit
    gcs, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={temp_dir}",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--disable-usage-stats",
                             # Own ports for what would otherwise take fixed defaults (agent 52365,
                             # client server 10001): the session's other Ray (the ray_cluster
                             # fixture) may hold those, and a head whose job agent cannot bind
                             # answers every submission with "No available agent".
                             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}"],
                            stdout=open(logs / "head.log", "wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(address, head)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster, *job: str) -> str:
    """``ray job submit`` of ``python <job...>`` with the repository as working dir; the job's log."""
    address, env = cluster
    cmd = [RAY, "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--", sys.executable, *job]
    # The dashboard answers before the node's job agent has registered; until then Ray refuses
    # with "No available agent to submit job, please try again later" (it took over 30 s once
    # under a loaded CI machine), so keep asking until a deadline.
    agent_deadline = time.monotonic() + 240
    while True:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
        log = p.stdout + p.stderr
        if "No available agent to submit job" not in log or time.monotonic() > agent_deadline:
            break
        time.sleep(3)
    assert p.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    return log


def test_ray_job_submit_runs_the_distill_job_on_its_own_cluster(cluster, tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    save_denoiser(build_denoiser(cfg.model, cfg.schedule), tmp_path / "teacher")
    out = tmp_path / "run"
    log = submit(cluster, "jobs/distill.py", "--config", "jobs/configs/sim-tiny.yaml", f"run.output_dir={out}",
                 f"model.pretrained_teacher_model={tmp_path / 'teacher'}", "train.max_steps=4",
                 "train.checkpoint_every=2")
    assert "[hyperscale] done: step 4" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["samples"] == 4 * 4 * 2
    assert load_config(out / "config.yaml").run.output_dir == str(out)
    gen = load_generator(out / "export/ema")
    assert torch.isfinite(gen.sample(torch.arange(2))).all()
    address, env = cluster
    listing = subprocess.run([RAY, "job", "list", f"--address={address}"], capture_output=True, text=True,
                             timeout=60, env=env)
    assert "SUCCEEDED" in listing.stdout


def test_ray_job_submit_runs_a_text_to_image_tiny_twin(cluster, tmp_path):
    """sd15-sim-tiny: the tiny SD1.5 pipeline (tiny:sd15) through SIM on 2 workers; the export is
    a pipeline folder that diffusers samples as hyperscale does."""
    from t2i_checks import check_export

    out = tmp_path / "run"
    log = submit(cluster, "jobs/distill.py", "--config", "jobs/configs/sd15-sim-tiny.yaml", f"run.output_dir={out}")
    assert "[hyperscale] done: step 4" in log
    assert json.loads((out / "metrics.json").read_text())["step"] == 4
    check_export(out / "export" / "ema")
