"""The trainer end to end through Ray Train (2 CPU workers, gloo): checkpoint, exact resume, export,
with DeepSpeed ZeRO-2 (the default) and ZeRO-3 engines and with the plain-torch path."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperscale.config import load_config
from hyperscale.models.build import load_denoiser
from hyperscale.train.checkpoint import find_latest, problems

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs/configs/teacher-tiny.yaml"


def _run(out: Path, *overrides: str) -> dict:
    from hyperscale.train.launch import run_training

    return run_training(load_config(TINY, [f"run.output_dir={out}", *overrides]))


def _shard_files(latest: Path, stage: int | None) -> set[str]:
    """What every rank must have contributed to a merged checkpoint of the tiny teacher run."""
    files = {"state.pt", "meta.json", "config.yaml", "manifests/rank-00000.json", "manifests/rank-00001.json"}
    if stage is None:  # plain torch: everything is in rank 0's state.pt
        return files
    d = "engines/generator/state/"
    files |= {d + "mp_rank_00_model_states.pt"} if stage < 3 else {
        d + f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
    return files | {d + f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}


ENGINES = [pytest.param(["train.zero_stage=2"], 2, id="zero2"),
           pytest.param(["train.zero_stage=3"], 3, id="zero3"),
           pytest.param(["train.engine=torch"], None, id="torch", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine,stage", ENGINES)
def test_teacher_trains_checkpoints_and_resumes_exactly(ray_cluster, tmp_path, engine, stage):
    straight = _run(tmp_path / "a", "train.max_steps=6", *engine)
    assert straight["step"] == 6
    assert json.loads((tmp_path / "a/metrics.json").read_text())["step"] == 6
    assert (tmp_path / "a/config.yaml").is_file()

    first = _run(tmp_path / "b", "train.max_steps=3", *engine)
    assert first["step"] == 3
    resumed = _run(tmp_path / "b", "train.max_steps=6", "train.resume_from_checkpoint=latest", *engine)
    assert resumed["step"] == 6 and resumed["samples"] == straight["samples"]
    assert resumed["time/restore_s"] > 0 and "time/restore_s" not in straight
    latest = find_latest(tmp_path / "b/checkpoints")
    assert json.loads((latest / "meta.json").read_text())["step"] == 6
    # every rank's shards made it into the merged checkpoint, complete per the ranks' manifests
    present = {str(p.relative_to(latest)) for p in latest.rglob("*") if p.is_file()}
    assert _shard_files(latest, stage) <= present, sorted(present)
    assert problems(latest) == []

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


@pytest.mark.parametrize("resume", [None, "some/other/checkpoint"])
def test_a_run_directory_with_checkpoints_needs_resume_latest(tmp_path, resume):
    """Ray Train would restore the directory's own latest checkpoint whatever the config says;
    the launcher refuses instead of silently resuming (no Ray is started)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/checkpoint_manager_snapshot.json").write_text("{}")
    extra = [f"train.resume_from_checkpoint={resume}"] if resume else []
    with pytest.raises(ValueError, match=r"already holds an earlier run's checkpoints.*resume_from_checkpoint=latest"):
        _run(tmp_path, *extra)
