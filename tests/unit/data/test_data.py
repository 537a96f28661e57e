"""Data layer: the Fashion-MNIST IDX loader and WebDataset shards (write, stream, skip)."""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import write_corrupt_shard
from hyperscale.storage.local import REPO
from hyperscale.data import shards as shards_mod
from hyperscale.data.fashion_mnist import (CLASS_NAMES, DatasetMissingError, ImageSet,
                                           load_fashion_mnist, read_idx, to_uint8)
from hyperscale.data.shards import (expand_shard_urls, shard_dataset, shard_pattern, write_shards)



def _idx_bytes(array: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()


def _tiny_set(n: int = 100, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                    rng.integers(0, 10, n).astype(np.int64))


def _pairs(images_u8: np.ndarray, labels) -> list[tuple[bytes, int]]:
    return sorted((img.tobytes(), int(lab)) for img, lab in zip(images_u8, labels))


def _stream_all(stream) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for x, y in stream:
        assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.long and y.shape == (len(x),)
        assert x.min() >= -1 and x.max() <= 1
        images.append(to_uint8(x))
        labels.append(y.numpy())
    if not images:
        return np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------------- IDX loader

def test_loader_reads_debian_files():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28)
    assert train.labels.dtype == np.int64
    assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))
    assert len(CLASS_NAMES) == 10


def test_loader_on_empty_dir_says_how_to_get_data(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_tiny_idx_parsed_exactly_and_truncation_is_an_error(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:  # .gz is read too
        f.write(_idx_bytes(labels))
    got = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.labels, [7, 1])
    assert got.labels.dtype == np.int64

    truncated = tmp_path / "short-idx3-ubyte"
    truncated.write_bytes(_idx_bytes(images)[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)
    bad_magic = tmp_path / "bad-idx3-ubyte"
    bad_magic.write_bytes(b"\x00\x00\x0d\x03" + _idx_bytes(images)[4:])
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(bad_magic)


# ---------------------------------------------------------------------- shard writing

def test_write_shards_layout_content_and_no_temp_files(tmp_path):
    data = _tiny_set(100)
    paths = write_shards(data, tmp_path / "shards", maxcount=30)
    assert [p.name for p in paths] == [f"train-{i:06d}.tar" for i in range(4)]
    assert sorted(os.listdir(tmp_path / "shards")) == [p.name for p in paths]  # nothing else
    pattern = shard_pattern(paths)
    assert pattern == str(tmp_path / "shards" / "train-{000000..000003}.tar")
    assert expand_shard_urls(pattern) == [str(p) for p in paths]

    with tarfile.open(paths[1]) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert len(names) == 3 * 30
        assert names[:3] == ["00000030.json", "00000030.png", "00000030.txt"]
        meta = json.loads(tar.extractfile("00000030.json").read())
        label = int(data.labels[30])
        assert meta == {"label": label, "class_name": CLASS_NAMES[label],
                        "prompt": f"a photo of a {CLASS_NAMES[label]}"}
        assert tar.extractfile("00000030.txt").read().decode() == meta["prompt"]
        from PIL import Image
        png = Image.open(io.BytesIO(tar.extractfile("00000030.png").read()))
        assert png.format == "PNG" and png.mode == "L" and png.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(png), data.images[30])
    with tarfile.open(paths[3]) as tar:
        assert len(tar.getnames()) == 3 * 10

    # same input, byte-identical shards
    again = write_shards(data, tmp_path / "again", maxcount=30)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))


def test_failed_write_leaves_no_partial_shard_or_temp_file(tmp_path, monkeypatch):
    real, calls = shards_mod._encode_png, {"n": 0}

    def flaky(image):
        calls["n"] += 1
        if calls["n"] == 45:  # inside the second shard
            raise OSError("disk went away")
        return real(image)

    monkeypatch.setattr(shards_mod, "_encode_png", flaky)
    with pytest.raises(OSError, match="disk went away"):
        write_shards(_tiny_set(100), tmp_path, maxcount=30)
    assert os.listdir(tmp_path) == ["train-000000.tar"]


def test_write_shards_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_shards(ImageSet(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64)), tmp_path)
    with pytest.raises(ValueError, match="class names"):
        write_shards(ImageSet(np.zeros((2, 28, 28), np.uint8), np.array([0, 10])), tmp_path)
    with pytest.raises(ValueError, match="consecutively"):
        shard_pattern([tmp_path / "train-000000.tar", tmp_path / "train-000002.tar"])
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------------- shard streaming

@pytest.fixture
def shard_dir(tmp_path):
    data = _tiny_set(100)
    paths = write_shards(data, tmp_path, maxcount=30)
    return data, paths


def test_stream_round_trips_every_sample_exactly(shard_dir):
    data, paths = shard_dir
    stream = shard_dataset(shard_pattern(paths), batch_size=16, shuffle_buffer=50, seed=3)
    images, labels = _stream_all(stream)
    assert len(labels) == 100
    assert _pairs(images, labels) == _pairs(data.images, data.labels)
    assert stream.skipped.count == 0
    # shuffled: the sample order differs from the written order, but is reproducible
    assert not np.array_equal(labels, data.labels)
    _, labels_again = _stream_all(shard_dataset(shard_pattern(paths), batch_size=16,
                                                shuffle_buffer=50, seed=3))
    np.testing.assert_array_equal(labels, labels_again)


def test_stream_splits_by_rank_and_by_loader_worker(shard_dir, monkeypatch):
    data, paths = shard_dir
    per_rank = []
    for rank in (0, 1):  # webdataset reads RANK/WORLD_SIZE like torch.distributed's
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(_stream_all(shard_dataset(paths, batch_size=8, shuffle_buffer=0)))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert len(per_rank[0][1]) == 30 + 30 and len(per_rank[1][1]) == 30 + 10  # 2 shards each
    images = np.concatenate([per_rank[0][0], per_rank[1][0]])
    labels = np.concatenate([per_rank[0][1], per_rank[1][1]])
    assert _pairs(images, labels) == _pairs(data.images, data.labels)

    stream = shard_dataset(paths, batch_size=8, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(stream.dataset, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    assert _pairs(*_stream_all(loader)) == _pairs(data.images, data.labels)


def test_resampled_stream_with_epoch_length(shard_dir):
    _, paths = shard_dir
    stream = shard_dataset(shard_pattern(paths), batch_size=8, resampled=True, epoch_samples=50)
    batches = list(stream)
    assert len(batches) == 6 and all(len(y) == 8 for _, y in batches)
    assert len(list(stream)) == 6  # the next epoch has the same length


def test_corrupt_png_is_skipped_and_counted(shard_dir):
    data, paths = shard_dir
    dst = write_corrupt_shard(paths[0], paths[0].with_name("corrupt-000000.tar"))
    stream = shard_dataset(dst, batch_size=7, shuffle_buffer=0)
    images, labels = _stream_all(stream)
    keep = [i for i in range(30) if i != 5]
    assert _pairs(images, labels) == _pairs(data.images[keep], data.labels[keep])
    assert stream.skipped.count == 1
    assert "00000005" in stream.skipped.recent[-1]


def test_truncated_shard_is_skipped_and_counted(shard_dir):
    data, paths = shard_dir
    size = paths[1].stat().st_size
    with open(paths[1], "r+b") as f:
        f.truncate(size // 2 + 100)  # cut inside a member
    stream = shard_dataset(shard_pattern(paths), batch_size=10, shuffle_buffer=20)
    images, labels = _stream_all(stream)
    assert stream.skipped.count >= 1
    got = _pairs(images, labels)
    assert set(got) <= set(_pairs(data.images, data.labels))
    assert 70 <= len(got) < 100  # the 3 intact shards and the readable head of the cut one


def test_all_errors_stop_instead_of_spinning(tmp_path):
    bad = tmp_path / "train-000000.tar"
    bad.write_bytes(b"this is no tar file" * 100)
    stream = shard_dataset(bad, batch_size=4, resampled=True, epoch_samples=8,
                           max_consecutive_skips=50)
    with pytest.raises(RuntimeError, match="in a row"):
        next(iter(stream))


def test_configuration_errors_fail_at_construction(tmp_path, shard_dir):
    _, paths = shard_dir
    with pytest.raises(ValueError, match="unsupported shard URL scheme"):
        shard_dataset("gs://bucket/train-{000000..000003}.tar", batch_size=4)
    with pytest.raises(FileNotFoundError):
        shard_dataset(str(paths[0].parent / "train-{000000..000009}.tar"), batch_size=4)
    with pytest.raises(FileNotFoundError):
        shard_dataset(tmp_path / "nope-000000.tar", batch_size=4)


# ------------------------------------------------------------------------- entry script

def test_make_shards_job_prints_pattern(tmp_path):
    images = np.arange(40 * 28 * 28, dtype=np.uint8).reshape(40, 28, 28)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(40) % 10))
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "make_shards.py"), "--split", "test",
                          "--out", str(tmp_path / "out"), "--maxcount", "16",
                          "--root", str(tmp_path / "idx")],
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == str(tmp_path / "out" / "test-{000000..000002}.tar")
    _, labels = _stream_all(shard_dataset(out.stdout.strip(), batch_size=16))
    assert sorted(labels.tolist()) == sorted((np.arange(40) % 10).tolist())
