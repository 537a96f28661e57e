"""S3 data path on a real HTTP S3 server (moto on 127.0.0.1): URLs and errors, shard
streaming equal to local streaming, rank split, corrupt objects, exact resume of shard
streams (local and S3), retries through an outage and a connection cut mid-object,
model exports from s3://, a training run through Ray that streams from S3, and runs whose
output directory is on S3 (checkpoints found, checked and resumed there; exports
published there and loaded back)."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer
from urllib3.exceptions import ProtocolError

from conftest import write_corrupt_shard
from hyperscale.data import s3
from hyperscale.data.fashion_mnist import ImageSet, to_uint8
from hyperscale.data.shards import shard_dataset, shard_pattern, write_shards

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "hs-test"


# ---------------------------------------------------------------------------- fixtures

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto S3 server on 127.0.0.1 that a test can stop and start again (its data
    lives in this process, so it survives a restart on the same port)."""

    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def moto(monkeypatch, tmp_path):
    server = Moto()
    server.start()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(s3.ATTEMPTS_ENV, "4")
    monkeypatch.setenv(s3.BACKOFF_ENV, "0.05")
    monkeypatch.setenv(s3.CACHE_ENV, str(tmp_path / "cache"))
    urllib.request.urlopen(urllib.request.Request(f"{server.endpoint}/moto-api/reset",
                                                  method="POST"), timeout=10).read()
    s3.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def _tiny_set(n: int = 100, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                    rng.integers(0, 10, n).astype(np.int64))


@pytest.fixture
def shards(moto, tmp_path):
    """100 samples in shards of 30/30/30/10, on disk and in the bucket under data/."""
    data = _tiny_set(100)
    paths = write_shards(data, tmp_path / "shards", maxcount=30)
    s3.upload_dir(tmp_path / "shards", f"s3://{BUCKET}/data")
    return data, shard_pattern(paths), f"s3://{BUCKET}/data/train-{{000000..000003}}.tar"


def _pairs(images_u8: np.ndarray, labels) -> list[tuple[bytes, int]]:
    return sorted((img.tobytes(), int(lab)) for img, lab in zip(images_u8, labels))


def _stream_all(stream) -> tuple[np.ndarray, np.ndarray]:
    batches = list(stream)
    if not batches:
        return np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64)
    return (np.concatenate([to_uint8(x) for x, _ in batches]),
            np.concatenate([y.numpy() for _, y in batches]))


def _same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------- URLs and errors

def test_urls_and_clear_errors(moto, shards, monkeypatch):
    assert s3.parse_s3_url("s3://b-1/x/y.tar") == ("b-1", "x/y.tar")
    assert s3.parse_s3_url("s3://b-1") == ("b-1", "")
    for bad in ("s3://", "s3:///key", "http://b/k", "s3://{a,b}/k"):
        with pytest.raises(ValueError, match="S3 URL"):
            s3.parse_s3_url(bad)

    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        shard_dataset("s3://no-such-bucket/train-{000000..000001}.tar", batch_size=4)
    with pytest.raises(FileNotFoundError, match="2 of 6 shards not found.*train-000004.tar"):
        shard_dataset(f"s3://{BUCKET}/data/train-{{000000..000005}}.tar", batch_size=4)
    with pytest.raises(FileNotFoundError, match="no such object"):
        s3.open_object(f"s3://{BUCKET}/data/missing.tar")
    with pytest.raises(FileNotFoundError, match="no objects under this prefix"):
        s3.cached_download(f"s3://{BUCKET}/nothing-here")

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(s3.S3AccessError, match="no AWS credentials found"):
        shard_dataset(shards[2], batch_size=4)


# ------------------------------------------------------------------ streaming from S3

def test_s3_stream_equals_local_stream(shards):
    data, local, remote = shards
    for kwargs in ({"shuffle_buffer": 50, "seed": 3}, {"shuffle_buffer": 0}):
        from_s3 = list(shard_dataset(remote, batch_size=16, **kwargs))
        _same_batches(from_s3, list(shard_dataset(local, batch_size=16, **kwargs)))
    images, labels = _stream_all(shard_dataset(remote, batch_size=16, shuffle_buffer=50, seed=3))
    assert _pairs(images, labels) == _pairs(data.images, data.labels)


def test_s3_stream_splits_by_rank(shards, monkeypatch):
    data, _, remote = shards
    per_rank = []
    for rank in (0, 1):  # webdataset's convention, as torch.distributed sets it
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(_stream_all(shard_dataset(remote, batch_size=8, shuffle_buffer=40)))
    keys = [set(_pairs(*r)) for r in per_rank]
    assert len(per_rank[0][1]) + len(per_rank[1][1]) == 100 and not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(_pairs(data.images, data.labels))


def test_corrupt_objects_are_counted_and_skipped(shards, tmp_path):
    data, _, _ = shards
    good = tmp_path / "shards" / "train-000000.tar"
    bad = write_corrupt_shard(good, tmp_path / "bad-000000.tar")
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2 + 100])
    s3.upload_file(bad, f"s3://{BUCKET}/bad/x-000000.tar")
    s3.upload_file(truncated, f"s3://{BUCKET}/bad/x-000001.tar")
    s3.client().put_object(Bucket=BUCKET, Key="bad/x-000002.tar", Body=b"no tar at all" * 50)

    stream = shard_dataset(f"s3://{BUCKET}/bad/x-{{000000..000002}}.tar", batch_size=7,
                           shuffle_buffer=0)
    images, labels = _stream_all(stream)
    got = set(_pairs(images, labels))
    intact = [i for i in range(30) if i != 5]
    assert set(_pairs(data.images[intact], data.labels[intact])) <= got
    assert len(got) <= 29 + 15 and stream.skipped.count >= 3  # png, cut tail, not a tar
    assert stream.skipped.by_type["ReadError"] >= 1
    assert any("00000005" in m for m in stream.skipped.recent)


# ------------------------------------------------------------------------ exact resume

RESUME_CASES = {
    "shuffled": dict(shuffle_buffer=40, seed=5),
    "ordered": dict(shuffle_buffer=0),
    "resampled": dict(resampled=True, epoch_samples=48, shuffle_buffer=20, seed=1),
}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_cursor_restores_exactly(shards, where, case):
    _, local, remote = shards
    url, kwargs = (local if where == "local" else remote), RESUME_CASES[case]
    make = lambda: shard_dataset(url, batch_size=8, **kwargs)  # noqa: E731
    # 100 samples = 12.5 batches per pass: k and the 30 batches after it cross passes,
    # windows and shards; k = 13 restores right after a partial window
    for k in (1, 5, 13):
        original = make()
        head = [next(original) for _ in range(k)]
        state = copy.deepcopy(original.state_dict())
        expected = [next(original) for _ in range(30)]
        restored = make()
        restored.load_state_dict(state)
        _same_batches([next(restored) for _ in range(30)], expected)
        assert all(len(y) == 8 for _, y in head + expected)  # next() never gives partial batches
    assert state["epoch"] >= 0 and state["skipped"]["count"] == 0


def test_cursor_restores_one_pass_iteration_and_skip_counts(shards, tmp_path):
    _, local, _ = shards
    cut = tmp_path / "shards" / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2 + 100])  # a truncated shard
    make = lambda: shard_dataset(local, batch_size=7, shuffle_buffer=35, seed=2)  # noqa: E731

    original = make()
    epoch0 = list(original)
    skipped0 = original.skipped.count
    epoch1 = list(original)
    assert skipped0 >= 1 and original.skipped.count == 2 * skipped0
    for k in range(len(epoch0) + 1):  # every point of the pass, its very end included
        partial = make()
        it = iter(partial)
        for _ in range(k):
            next(it)
        restored = make()
        restored.load_state_dict(copy.deepcopy(partial.state_dict()))
        if k < len(epoch0):  # the rest of the pass, then the next pass
            _same_batches(list(restored), epoch0[k:])
            assert restored.skipped.count == skipped0  # each error counted once, as unbroken
        _same_batches(list(restored), epoch1)
        assert restored.skipped.count == 2 * skipped0


# ----------------------------------------------------------------------------- retries

def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_retry_policy_classifies_errors():
    url, fast = "s3://bucket/key", s3.Retry(attempts=3, base_delay=0.001)
    failures = [_client_error("SlowDown", 503), ConnectionResetError("reset")]

    def flaky():
        if failures:
            raise failures.pop(0)
        return "ok"

    assert s3.call(flaky, url, fast) == "ok" and not failures  # 5xx/throttle, then a reset
    calls = []

    def missing():
        calls.append(1)
        raise _client_error("NoSuchKey", 404)

    with pytest.raises(FileNotFoundError, match="s3://bucket/key: no such object"):
        s3.call(missing, url, fast)
    assert len(calls) == 1  # permanent errors are not retried
    with pytest.raises(s3.S3AccessError, match="access denied"):
        s3.call(lambda: (_ for _ in ()).throw(_client_error("AccessDenied", 403)), url, fast)

    def down():
        calls.append(1)
        raise _client_error("InternalError", 500)

    calls.clear()
    with pytest.raises(s3.S3UnavailableError, match="s3://bucket/key: S3 request failed 3 times"):
        s3.call(down, url, fast)
    assert len(calls) == 3
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)]:  # doubling, capped, jittered
        assert cap / 2 <= s3.Retry(5, base_delay=1.0, max_delay=3.0).delay(attempt) <= cap


class _BreaksOnce:
    """The real client, except that the first GET's body breaks after ``after`` bytes."""

    def __init__(self, real, after: int, before_resume=None):
        self.real, self.after, self.before_resume, self.calls = real, after, before_resume, []

    def get_object(self, **kwargs):
        self.calls.append(kwargs)
        if len(self.calls) == 2 and self.before_resume:
            self.before_resume()
        resp = self.real.get_object(**kwargs)
        if len(self.calls) == 1:
            body, left = resp["Body"], [self.after]

            class Breaking:
                def read(self, n):
                    if left[0] <= 0:
                        raise ProtocolError("Connection broken: IncompleteRead")
                    data = body.read(min(n, left[0]))
                    left[0] -= len(data)
                    return data

                def close(self):
                    body.close()

            resp["Body"] = Breaking()
        return resp


def test_reader_resumes_mid_object_with_a_range_request(shards, tmp_path):
    url = f"s3://{BUCKET}/data/train-000000.tar"
    expected = (tmp_path / "shards" / "train-000000.tar").read_bytes()
    flaky = _BreaksOnce(s3.client(), after=5000)
    with s3.open_object(url, s3=flaky) as f:
        assert f.read() == expected
    assert len(flaky.calls) == 2 and flaky.calls[1]["Range"] == "bytes=5000-"
    assert flaky.calls[1]["IfMatch"].strip('"')  # pinned to the version first read

    def overwrite():
        s3.client().put_object(Bucket=BUCKET, Key="data/train-000000.tar", Body=b"new" * 10)

    with pytest.raises(OSError, match="changed while it was being read"):
        with s3.open_object(url, s3=_BreaksOnce(s3.client(), 5000, overwrite)) as f:
            f.read()


def test_stream_rides_out_an_outage(shards, moto, monkeypatch):
    data, _, remote = shards
    monkeypatch.setenv(s3.ATTEMPTS_ENV, "12")
    monkeypatch.setenv(s3.BACKOFF_ENV, "0.1")  # waits 0.05-0.1, 0.1-0.2, ...: > 2 s by try 7
    stream = shard_dataset(remote, batch_size=10, shuffle_buffer=0)
    it = iter(stream)
    first = next(it)  # mid-stream: the first shard is open, three are to come
    moto.stop()
    restart = threading.Timer(2.0, moto.start)
    restart.start()
    t0 = time.monotonic()
    rest = list(it)
    restart.join()
    assert time.monotonic() - t0 > 1.5  # it really waited for the server
    images, labels = _stream_all([first] + rest)
    assert _pairs(images, labels) == _pairs(data.images, data.labels)
    assert stream.skipped.count == 0

    stream = shard_dataset(remote, batch_size=10, shuffle_buffer=0)
    moto.stop()  # down for good: a clear error naming the URL, not a skipped shard
    monkeypatch.setenv(s3.ATTEMPTS_ENV, "2")
    with pytest.raises(s3.S3UnavailableError, match="s3://hs-test/data/train-000000.tar: S3 "
                                                    "request failed 2 times"):
        list(stream)
    with pytest.raises(s3.S3UnavailableError, match="s3://hs-test/data/: S3 request failed"):
        shard_dataset(remote, batch_size=10)


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
        assert sorted(uploaded) == [f"{url}/hyperscale_model.json", f"{url}/model.safetensors"]
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
    if drop_rank1_shard:  # Ray's merge once lost a shard (STACK.md §3)
        (r1 / "engines/generator/state/zero_pp_rank_1_optim_states.pt").unlink()
    s3.upload_dir(r0, url)
    s3.upload_dir(r1, url)
    bucket, key = s3.parse_s3_url(url)
    s3.client().put_object(Bucket=bucket, Key=key + "/engines/", Body=b"")  # a pyarrow "directory"


def test_checkpoints_on_s3_are_found_checked_and_copied(moto, tmp_path):
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
    with ckpt.local_copy(tmp_path / "s2-r0") as local:
        assert local == tmp_path / "s2-r0"  # local checkpoints are used in place
    with ckpt.local_copy(None) as local:
        assert local is None


def test_exports_are_published_to_s3_metadata_last(moto, tmp_path, monkeypatch):
    from hyperscale.config import load_config
    from hyperscale.io import staged_dir
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
