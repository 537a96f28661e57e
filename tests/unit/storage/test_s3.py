"""S3 data path on a real HTTP S3 server (moto on 127.0.0.1, tests/s3_server.py): URLs and
errors, shard streaming equal to local streaming, rank split, corrupt objects, exact resume
of shard streams (local and S3), retries through an outage and a connection cut mid-object."""
from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch
from botocore.exceptions import ClientError
from urllib3.exceptions import ProtocolError

from conftest import write_corrupt_shard
from hyperscale.storage import s3
from hyperscale.data.fashion_mnist import to_uint8
from hyperscale.data.shards import shard_dataset
from s3_server import BUCKET  # its fixtures (moto, shards) come through conftest.py


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
