"""The trainer end to end through Ray Train (2 CPU workers, gloo): checkpoint, exact resume, export."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperscale.config import load_config
from hyperscale.models.build import load_denoiser
from hyperscale.train.checkpoint import find_latest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs/configs/teacher-tiny.yaml"


def _run(out: Path, *overrides: str) -> dict:
    from hyperscale.train.launch import run_training

    return run_training(load_config(TINY, [f"run.output_dir={out}", *overrides]))


def test_teacher_trains_checkpoints_and_resumes_exactly(ray_cluster, tmp_path):
    straight = _run(tmp_path / "a", "train.max_steps=6")
    assert straight["step"] == 6
    assert json.loads((tmp_path / "a/metrics.json").read_text())["step"] == 6
    assert (tmp_path / "a/config.yaml").is_file()

    first = _run(tmp_path / "b", "train.max_steps=3")
    assert first["step"] == 3
    resumed = _run(tmp_path / "b", "train.max_steps=6", "train.resume_from_checkpoint=latest")
    assert resumed["step"] == 6 and resumed["samples"] == straight["samples"]
    latest = find_latest(tmp_path / "b/checkpoints")
    assert json.loads((latest / "meta.json").read_text())["step"] == 6

    # Same data, same RNG, same optimizer state: the resumed run is the straight run, bit for bit.
    for kind in ("raw", "ema"):
        a = load_file(str(tmp_path / f"a/export/{kind}/model.safetensors"))
        b = load_file(str(tmp_path / f"b/export/{kind}/model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), kind

    model = load_denoiser(tmp_path / "b/export/ema")
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28), torch.tensor([10, 900]), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def test_resume_from_a_bad_path_is_a_clear_error(ray_cluster, tmp_path):
    with pytest.raises(Exception, match="not a checkpoint directory"):
        _run(tmp_path / "c", f"train.resume_from_checkpoint={tmp_path}/nothing-here")
