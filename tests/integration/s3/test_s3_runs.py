"""Models, training and run outputs on S3 (moto on 127.0.0.1, tests/s3_server.py): model
exports from s3://, a training run through Ray that streams its shards from S3, and runs whose
output directory is on S3 (checkpoints found, checked and resumed there; exports published
there and loaded back)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperscale.storage.local import REPO
from hyperscale.storage import s3
from s3_server import BUCKET  # its fixtures (moto, shards) come through conftest.py

ROOT = REPO  # the repository root


# ------------------------------------------------------------------- directories, models

def test_model_export_from_s3(moto, tmp_path):
    from hyperscale.config import load_config
    from hyperscale.models.build import build_denoiser, load_denoiser, resolve_source, save_denoiser

    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    url = f"s3://{BUCKET}/models/teacher"
    weights = []
    for seed in (0, 1):  # an export, then a changed export at the same prefix
        torch.manual_seed(seed)
        model = build_denoiser(cfg.model, cfg.schedule)
        save_denoiser(model, tmp_path / f"export{seed}", {"seed": seed})
        uploaded = s3.upload_dir(tmp_path / f"export{seed}", url + "/")
        local = tmp_path / f"export{seed}"
        assert sorted(uploaded) == sorted(f"{url}/{p.relative_to(local).as_posix()}" for p in local.rglob("*") if p.is_file())
        assert {f"{url}/hyperscale_model.json", f"{url}/model.safetensors", f"{url}/README.md"} <= set(uploaded)
        loaded = load_denoiser(url)
        state = loaded.state_dict()
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        weights.append(resolve_source(url))
        assert resolve_source(url) == weights[-1]  # unchanged: served from the cache
        assert json.loads((weights[-1] / "hyperscale_model.json").read_text())["extra"]["seed"] == seed
    assert weights[0] != weights[1] and weights[0].parent == weights[1].parent
    assert str(weights[0]).startswith(os.environ[s3.CACHE_ENV])
    assert not [p for p in weights[0].parent.iterdir() if p.name.startswith(".tmp-")]

    # a finished download is never replaced under its readers; nested paths round-trip
    before = (weights[1] / "model.safetensors").stat().st_ino
    assert s3.download_dir(url, weights[1]) == weights[1]
    assert (weights[1] / "model.safetensors").stat().st_ino == before
    (tmp_path / "tree" / "a" / "b").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "b" / "c.txt").write_text("deep")
    (tmp_path / "tree" / "top.txt").write_text("top")
    s3.upload_dir(tmp_path / "tree", f"s3://{BUCKET}/tree")
    got = s3.download_dir(f"s3://{BUCKET}/tree", tmp_path / "back")
    assert (got / "a" / "b" / "c.txt").read_text() == "deep" and (got / "top.txt").read_text() == "top"


# ------------------------------------------------------------------- through Ray Train

@pytest.mark.slow  # two Ray runs: 3 min measured on 2 cores shared with a training job
def test_training_streams_shards_from_s3_through_ray(shards, tmp_path):
    """The tiny teacher preset on 2 Ray workers reading s3:// shards; stop, resume.
    Ray workers inherit the AWS_* settings from the job's environment."""
    _, _, remote = shards
    out = tmp_path / "run"

    def train(*overrides: str) -> str:
        cmd = [sys.executable, str(ROOT / "jobs/pretrain_teacher.py"), "--config",
               str(ROOT / "jobs/configs/teacher-tiny.yaml"), f"run.output_dir={out}",
               f"data.train_shards_path_or_url={remote}", *overrides]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout + p.stderr

    train("train.max_steps=3")
    log = train("train.max_steps=6", "train.resume_from_checkpoint=latest")
    assert "resumed at step 3" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["samples"] == 6 * 16 * 2
    last = max((out / "checkpoints").glob("checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime)
    cursors = torch.load(last, weights_only=False)["data"]
    assert [c["kind"] for c in cursors] == ["shards", "shards"]
    assert [(c["layout"]["rank"], c["layout"]["world_size"]) for c in cursors] == [(0, 2), (1, 2)]
    assert all(c["skipped"]["count"] == 0 for c in cursors)


# ------------------------------------------------------------ run outputs on S3

def _fake_checkpoint(tmp: Path, url: str, step: int, run_id: str, drop_rank1_shard: bool = False) -> None:
    """A 2-rank checkpoint as Ray merges it: each rank's files written apart, uploaded to one prefix."""
    from hyperscale.train import checkpoint as ckpt

    r0, r1 = tmp / f"s{step}-r0", tmp / f"s{step}-r1"
    (r1 / "engines/generator/state").mkdir(parents=True)
    (r1 / "engines/generator/state/zero_pp_rank_1_optim_states.pt").write_bytes(b"x" * 100)
    ckpt.write_rank(r0, 0, [], {"step": step}, {"step": step, "world_size": 2, "run_id": run_id}, "c: 1\n")
    ckpt.write_rank(r1, 1, [])
    if drop_rank1_shard:  # Ray's merge once lost a shard (docs/stack.md §3)
        (r1 / "engines/generator/state/zero_pp_rank_1_optim_states.pt").unlink()
    s3.upload_dir(r0, url)
    s3.upload_dir(r1, url)
    bucket, key = s3.parse_s3_url(url)
    for marker in ("/", "/engines/"):  # pyarrow "directories" (Ray's storage writes the checkpoint's own)
        s3.client().put_object(Bucket=bucket, Key=key + marker, Body=b"")


def test_checkpoints_on_s3_are_found_checked_and_copied(moto, tmp_path, monkeypatch):
    from hyperscale.train import checkpoint as ckpt

    root = f"s3://{BUCKET}/run/checkpoints"
    _fake_checkpoint(tmp_path, f"{root}/checkpoint_a", 2, "run-a")
    _fake_checkpoint(tmp_path, f"{root}/checkpoint_b", 4, "run-b")
    _fake_checkpoint(tmp_path, f"{root}/checkpoint_c", 6, "run-b", drop_rank1_shard=True)

    assert ckpt.problems(f"{root}/checkpoint_b") == []
    assert ckpt.problems(f"{root}/checkpoint_c") == [
        "rank 1: engines/generator/state/zero_pp_rank_1_optim_states.pt missing or truncated"]
    assert ckpt.find_latest(root) == f"{root}/checkpoint_b"  # the newest *complete* one
    assert ckpt.find_latest(root, run_id="run-a") == f"{root}/checkpoint_a"
    assert ckpt.find_latest(root, run_id="run-z") is None
    assert ckpt.find_latest(f"s3://{BUCKET}/elsewhere") is None
    assert ckpt.meta_step(f"{root}/checkpoint_b") == 4
    assert ckpt.resolve_resume("latest", root) == f"{root}/checkpoint_b"
    assert ckpt.resolve_resume(f"{root}/checkpoint_a/", root) == f"{root}/checkpoint_a"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        ckpt.resolve_resume(f"{root}/nothing-here", root)

    with ckpt.local_copy(f"{root}/checkpoint_b") as local:
        assert ckpt.problems(local) == [] and ckpt.read_checkpoint(local) == {"step": 4}
        assert (local / "engines/generator/state/zero_pp_rank_1_optim_states.pt").is_file()
    assert not local.exists()  # every process's own temp copy, removed after the restore
    shard1 = "engines/generator/state/zero_pp_rank_1_optim_states.pt"
    reads = []
    monkeypatch.setattr(s3, "read_text", lambda url, _read=s3.read_text: reads.append(url) or _read(url))
    with ckpt.local_copy(f"{root}/checkpoint_b", rank=0) as local:  # rank 0's part: not rank 1's shard
        assert sorted(u.rsplit("/", 1)[1] for u in reads) == ["meta.json", "rank-00000.json", "rank-00001.json"]
        assert not (local / shard1).exists() and (local / "manifests/rank-00001.json").is_file()
        assert json.loads((local / ckpt.SUBSET).read_text())["ranks"] == [0]
        assert ckpt.problems(local) == [] and ckpt.read_checkpoint(local) == {"step": 4}
        (local / "state.pt").unlink()
        assert ckpt.problems(local) == ["no state.pt / meta.json"]
    with ckpt.local_copy(f"{root}/checkpoint_b", rank=3) as local:  # a rank the 2-rank checkpoint lacks
        assert not (local / shard1).exists() and ckpt.problems(local) == []
    with ckpt.local_copy(f"{root}/checkpoint_b", rank=1) as local:
        assert (local / shard1).is_file() and ckpt.problems(local) == []
        (local / shard1).unlink()  # the ranks a copy names are still checked
        assert ckpt.problems(local) == [f"rank 1: {shard1} missing or truncated"]
    with pytest.raises(FileNotFoundError, match=f"incomplete checkpoint: rank 1: {shard1} missing"):
        with ckpt.local_copy(f"{root}/checkpoint_c", rank=0):
            pass
    with ckpt.local_copy(tmp_path / "s2-r0") as local:
        assert local == tmp_path / "s2-r0"  # local checkpoints are used in place
    with ckpt.local_copy(None) as local:
        assert local is None


def test_exports_are_published_to_s3_metadata_last(moto, tmp_path, monkeypatch):
    from hyperscale.config import load_config
    from hyperscale.storage.local import staged_dir
    from hyperscale.models.build import EXPORT_META, build_denoiser, load_denoiser
    from hyperscale.models.lora import LORA_WEIGHTS, apply_lora, merge_lora, save_student

    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    torch.manual_seed(0)
    student = apply_lora(build_denoiser(cfg.model, cfg.schedule), rank=4)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a LoRA that changes the weights
    run = f"s3://{BUCKET}/runs/lora"
    order = []
    real_upload = s3.upload_file
    monkeypatch.setattr(s3, "upload_file", lambda path, url, retry=None: (order.append(url),
                                                                          real_upload(path, url, retry)))
    with staged_dir(run, last=(EXPORT_META,)) as d:
        save_student(student, d / "export/ema", {"step": 3})
        (d / "samples.png").write_bytes(b"png")
    keys = {o.url[len(run) + 1:] for o in s3.list_objects(run + "/")}
    assert keys >= {"samples.png", "export/ema/model.safetensors", f"export/ema/{EXPORT_META}",
                    f"export/ema/lora/{LORA_WEIGHTS}"}
    assert order[-1] == f"{run}/export/ema/{EXPORT_META}"  # the "done" marker of the export
    merged = merge_lora(student).state_dict()
    loaded = load_denoiser(f"{run}/export/ema").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in merged.items())

    # A full student exported to the same place replaces the LoRA export, lora/ included.
    with staged_dir(run + "/export", last=(EXPORT_META,)) as d:
        save_student(build_denoiser(cfg.model, cfg.schedule), d / "ema", {"step": 6})
    keys = {o.url[len(run) + 1:] for o in s3.list_objects(run + "/")}
    assert not [k for k in keys if "/lora/" in k] and "samples.png" in keys
    assert json.loads(s3.read_text(f"{run}/export/ema/{EXPORT_META}"))["extra"]["step"] == 6


def test_s3_output_dir_errors_name_the_problem(moto, monkeypatch):
    from hyperscale.config import load_config
    from hyperscale.train.launch import run_training

    def run(out: str):
        run_training(load_config(ROOT / "jobs/configs/sim-tiny.yaml", [f"run.output_dir={out}"]))

    with pytest.raises(ValueError, match="run.output_dir: 's3:///x': bad S3 URL"):
        run("s3:///x")
    with pytest.raises(FileNotFoundError, match="run.output_dir=s3://no-such-bucket/run cannot be "
                                                "written: .*bucket 'no-such-bucket' does not exist"):
        run("s3://no-such-bucket/run")
    monkeypatch.setenv(s3.ATTEMPTS_ENV, "2")
    moto.stop()
    with pytest.raises(s3.S3UnavailableError, match=f"run.output_dir=s3://{BUCKET}/run cannot be written: "
                                                    f".*S3 request failed 2 times .endpoint {moto.endpoint}"):
        run(f"s3://{BUCKET}/run")
    moto.start()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(s3.S3AccessError, match="run.output_dir=.*no AWS credentials found"):
        run(f"s3://{BUCKET}/run")


def test_distill_with_s3_output_dir_stops_resumes_and_exports(ray_cluster, moto, tmp_path):
    """SIM on 2 Ray workers with run.output_dir=s3://: checkpoints (every rank's shards) in the
    bucket, resume from the newest there, config/metrics/export in the bucket, the generator
    loaded back from s3://. The session's Ray was started without the moto settings: the
    driver's S3 settings reach the workers through run_training."""
    from hyperscale.config import load_config
    from hyperscale.models.build import build_denoiser, save_denoiser
    from hyperscale.models.generator import load_generator
    from hyperscale.train import checkpoint as ckpt
    from hyperscale.train.launch import run_training

    torch.manual_seed(0)
    tcfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    save_denoiser(build_denoiser(tcfg.model, tcfg.schedule), tmp_path / "teacher")
    out = f"s3://{BUCKET}/runs/sim"

    def train(*overrides: str) -> dict:
        return run_training(load_config(ROOT / "jobs/configs/sim-tiny.yaml", [
            f"run.output_dir={out}/", f"model.pretrained_teacher_model={tmp_path / 'teacher'}", *overrides]))

    first = train("train.max_steps=3")
    assert first["step"] == 3 and "restored_at_step" not in first
    resumed = train("train.max_steps=6", "train.resume_from_checkpoint=latest")
    assert resumed["step"] == 6 and resumed["restored_at_step"] == 3

    keys = {o.url[len(out) + 1:] for o in s3.list_objects(out + "/")}
    assert {"config.yaml", "metrics.json", "samples.png"} <= keys
    assert "output_dir: s3://hs-test/runs/sim\n" in s3.read_text(f"{out}/config.yaml")
    assert json.loads(s3.read_text(f"{out}/metrics.json"))["step"] == 6
    for kind in ("ema", "raw"):
        assert {f"export/{kind}/model.safetensors", f"export/{kind}/hyperscale_model.json"} <= keys
    latest = ckpt.find_latest(f"{out}/checkpoints")
    assert latest is not None and ckpt.meta_step(latest) == 6 and ckpt.problems(latest) == []
    d = latest[len(out) + 1:] + "/"
    files = {k[len(d):] for k in keys if k.startswith(d)}
    assert {"state.pt", "meta.json", "manifests/rank-00000.json", "manifests/rank-00001.json"} <= files
    for role in ("generator", "fake_score"):  # ZeRO-2: every rank's optimizer shard
        for r in (0, 1):
            assert f"engines/{role}/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in files, sorted(files)

    gen = load_generator(f"{out}/export/ema")
    images = gen.sample(torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 28, 28) and torch.isfinite(images).all()
