"""jobs/distill.py end to end: SIM on a tiny teacher, 2 Ray workers, stop after a checkpoint,
resume, and load the exported 1-step generator without Ray or the trainer."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from hyperscale.storage.local import REPO
from hyperscale.config import load_config
from hyperscale.models.build import build_denoiser, save_denoiser
from hyperscale.models.generator import load_generator

ROOT = REPO  # the repository root


def _distill(out: Path, teacher: Path, *overrides: str) -> str:
    cmd = [sys.executable, str(ROOT / "jobs/distill.py"), "--config", str(ROOT / "jobs/configs/sim-tiny.yaml"),
           f"run.output_dir={out}", f"model.pretrained_teacher_model={teacher}", *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def test_sim_distill_stops_resumes_and_exports(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    save_denoiser(build_denoiser(cfg.model, cfg.schedule), tmp_path / "teacher")

    _distill(tmp_path / "run", tmp_path / "teacher", "train.max_steps=3")
    assert json.loads((tmp_path / "run/metrics.json").read_text())["step"] == 3
    log = _distill(tmp_path / "run", tmp_path / "teacher", "train.max_steps=6", "train.resume_from_checkpoint=latest")
    assert "resumed at step 3" in log
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["samples"] == 6 * 4 * 2
    assert "loss/fake_score" in metrics and "loss/generator" in metrics
    resolved = load_config(tmp_path / "run/config.yaml")
    assert resolved.method.name == "sim" and resolved.method.distance == "pseudo_huber"
    assert Image.open(tmp_path / "run/samples.png").size[0] > 0

    gen = load_generator(tmp_path / "run/export/ema")
    assert gen.timestep == gen.denoiser.schedule.timestep_for_sigma_ve(2.5)
    x = gen.sample(torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all()


def test_no_ray_run_stops_on_its_time_budget_and_resumes_exactly(tmp_path):
    """--no-ray: one worker in this process. train.max_minutes stops at the first logged step
    past the budget with a checkpoint and an export; a resume then lands on the same weights
    as an uninterrupted run."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    save_denoiser(build_denoiser(cfg.model, cfg.schedule), tmp_path / "teacher")
    local = ["--no-ray", "train.num_workers=1", "train.engine=torch", "train.log_every=2", "train.checkpoint_every=100"]

    log = _distill(tmp_path / "cut", tmp_path / "teacher", *local, "train.max_steps=1000", "train.max_minutes=1e-6")
    assert "train.max_minutes=1e-06 spent at step 2" in log
    assert json.loads((tmp_path / "cut/metrics.json").read_text())["step"] == 2
    assert sorted(p.name for p in (tmp_path / "cut/checkpoints").iterdir()) == ["step_00000002"]
    assert (tmp_path / "cut/export/ema/model.safetensors").is_file()
    log = _distill(tmp_path / "cut", tmp_path / "teacher", *local, "train.max_steps=4",
                   "train.resume_from_checkpoint=latest")
    assert "resumed at step 2" in log
    assert json.loads((tmp_path / "cut/metrics.json").read_text())["samples"] == 4 * 4

    _distill(tmp_path / "whole", tmp_path / "teacher", *local, "train.max_steps=4")
    for kind in ("raw", "ema"):
        cut, whole = (load_file(tmp_path / d / "export" / kind / "model.safetensors") for d in ("cut", "whole"))
        assert cut.keys() == whole.keys()
        assert all(torch.equal(cut[k], whole[k]) for k in cut), kind


def test_no_ray_run_refuses_several_workers(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "jobs/distill.py"), "--no-ray", "--config",
                        str(ROOT / "jobs/configs/sim-tiny.yaml"), f"run.output_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "train.num_workers=2: a run without Ray has one worker" in p.stderr
    assert not (tmp_path / "run").exists()


def test_local_session_keeps_the_newest_complete_checkpoints(tmp_path):
    """Without Ray, reported checkpoints land whole under their step names; the newest
    train.keep_checkpoints stay, and find_latest resumes the newest."""
    from hyperscale.train.checkpoint import find_latest
    from hyperscale.train.local import LocalSession

    session = LocalSession(tmp_path / "checkpoints", keep=2)
    for step in (5, 10, 15):
        d = tmp_path / "staging" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "state.pt").write_bytes(b"x" * step)
        (d / "meta.json").write_text(json.dumps({"step": step, "world_size": 1, "format": 1}))
        session.report({"step": step}, d)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010", "step_00000015"]
    assert find_latest(tmp_path / "checkpoints") == tmp_path / "checkpoints/step_00000015"
