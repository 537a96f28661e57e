"""A moto S3 server on 127.0.0.1 for the S3 tests (test_s3.py: the data path; test_s3_runs.py:
exports, training and run outputs on S3), as pytest fixtures: ``moto`` (an empty bucket
``BUCKET``, this process's AWS settings pointed at it) and ``shards`` (100 samples in four
WebDataset shards, on disk and in the bucket)."""
from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from hyperscale.storage import s3
from hyperscale.data.fashion_mnist import ImageSet
from hyperscale.data.shards import shard_pattern, write_shards

BUCKET = "hs-test"

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
