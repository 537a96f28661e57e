"""jobs/distill.py end to end: SIM on a tiny teacher, 2 Ray workers, stop after a checkpoint,
resume, and load the exported 1-step generator without Ray or the trainer."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from hyperscale.config import load_config
from hyperscale.models.build import build_denoiser, save_denoiser
from hyperscale.models.generator import load_generator

ROOT = Path(__file__).resolve().parent.parent


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
