"""Caption shards (LAION-style WebDataset) for text-to-image methods: writing, streaming as
CaptionBatch (images resized and centre-cropped, precomputed latents and text arrays),
the batch kind rule, bad records skipped and counted, exact resume, S3, and the caption
mode of jobs/make_shards.py."""
from __future__ import annotations

import copy
import importlib.util
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from conftest import write_corrupt_shard
from hyperscale.data.captions import (CaptionBatch, caption_shard_dataset, load_image,
                                      write_caption_shards)
from hyperscale.data.fmnist_captions import SYNONYMS
from hyperscale.data.fashion_mnist import CLASS_NAMES, ImageSet
from hyperscale.data.shards import shard_pattern
from hyperscale.storage import s3
from hyperscale.storage.local import REPO
from s3_server import BUCKET  # its fixtures (moto) come through conftest.py


def _samples(n: int, seed: int = 0, latent: bool = False, text: bool = False) -> list[dict]:
    """Images of mixed sizes and modes (grayscale (H, W), RGB (H, W, 3)), all >= 16 px."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = [(16, 16), (20, 30, 3), (40, 24), (16, 16, 3)][i % 4]
        s = {"image": rng.integers(0, 256, shape, dtype=np.uint8), "caption": f"caption {i} ✓",
             "meta": {"i": i}}
        if latent:
            s["latent"] = rng.standard_normal((4, 2, 2)).astype(np.float16)
        if text:
            s["text"] = {"embeds": rng.standard_normal((5, 8)).astype(np.float32),
                         "pooled": rng.standard_normal(6).astype(np.float16),
                         "mask": np.arange(5) < (i % 5 + 1), "time_ids": np.arange(6) + i}
        out.append(s)
    return out


def _all(stream) -> list[CaptionBatch]:
    return list(stream)


def _same(a: list[CaptionBatch], b: list[CaptionBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.prompts == y.prompts
        for f in ("images", "latents"):
            assert (getattr(x, f) is None) == (getattr(y, f) is None)
            assert getattr(x, f) is None or torch.equal(getattr(x, f), getattr(y, f))
        assert (x.text is None) == (y.text is None)
        assert x.text is None or all(torch.equal(x.text[k], y.text[k]) for k in x.text)


def _rewrite(src, dst, change) -> None:
    """Copy a shard, passing each member (name, payload) through ``change`` (None drops it)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            payload = change(info.name, tin.extractfile(info).read())
            if payload is not None:
                info.size = len(payload)
                tout.addfile(info, io.BytesIO(payload))


# ---------------------------------------------------------------------------- writing

def test_write_layout_and_deterministic_bytes(tmp_path):
    samples = _samples(25, latent=True, text=True)
    paths = write_caption_shards(samples, tmp_path / "a", maxcount=10)
    assert [p.name for p in paths] == [f"train-{i:06d}.tar" for i in range(3)]
    with tarfile.open(paths[1]) as tar:
        names = tar.getnames()
        assert names[:5] == ["00000010.json", "00000010.latent.npy", "00000010.png",
                             "00000010.text.npz", "00000010.txt"]
        assert len(names) == 50
        assert tar.extractfile("00000010.txt").read().decode() == "caption 10 ✓"
        npz = np.load(io.BytesIO(tar.extractfile("00000010.text.npz").read()))
        assert sorted(npz.files) == ["embeds", "mask", "pooled", "time_ids"]
    again = write_caption_shards(samples, tmp_path / "b", maxcount=10)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))
    assert sorted(os.listdir(tmp_path / "a")) == [p.name for p in paths]  # no temp files


def test_write_rejects_bad_samples(tmp_path):
    good = _samples(1)[0]
    cases = [({"caption": ""}, "caption must be a non-empty string"),
             ({"caption": None}, "caption must be"),
             ({"image": np.zeros((8, 8), np.float32)}, "image must be uint8"),
             ({"image": np.zeros((8, 8, 4), np.uint8)}, "image must be uint8"),
             ({"latent": np.zeros((4, 2), np.float32)}, "latent must be float16/float32 \\(C, h, w\\)"),
             ({"text": {}}, "text must be a non-empty dict"),
             ({"label": 3}, "unknown fields \\['label'\\]")]
    for change, message in cases:
        with pytest.raises(ValueError, match=f"sample 1: {message}"):
            write_caption_shards([good, {**good, **change}], tmp_path / "x")
    with pytest.raises(ValueError, match="no samples"):
        write_caption_shards([], tmp_path / "y")
    assert not os.listdir(tmp_path / "x")  # the shard of a failed write never appears


# -------------------------------------------------------------------------- streaming

def test_images_are_converted_resized_and_centre_cropped():
    def png(a):
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    exact = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(png(exact), 16, 3), exact)  # already square: as is
    wide = np.zeros((32, 96), np.uint8)
    wide[:, 32:64] = 255  # white middle third
    out = load_image(png(wide), 16, 1)  # short side 32 -> 16, then the middle 16 of 48 columns
    assert out.shape == (16, 16, 1) and out.mean() > 250
    tall = np.zeros((90, 30), np.uint8)
    tall[:30] = 255  # white top third: the crop keeps the middle, black
    out = load_image(png(tall), 10, 3)
    assert out.shape == (10, 10, 3) and out[1:].max() == 0 and out.mean() < 5  # (edge: bicubic)
    gray_as_rgb = load_image(png(exact[:, :, 0]), 16, 3)
    assert all(np.array_equal(gray_as_rgb[..., c], exact[:, :, 0]) for c in range(3))


@pytest.mark.parametrize("channels", [1, 3])
def test_stream_round_trips_captions_and_images(tmp_path, channels):
    samples = _samples(30)
    paths = write_caption_shards(samples, tmp_path, maxcount=8)
    stream = caption_shard_dataset(shard_pattern(paths), batch_size=7, resolution=12,
                                   channels=channels, shuffle_buffer=10, seed=4)
    batches = _all(stream)
    assert [len(b) for b in batches] == [7, 7, 7, 7, 2] and stream.skipped.count == 0
    for b in batches:
        assert isinstance(b, CaptionBatch) and b.latents is None and b.text is None
        assert b.images.dtype == torch.float32 and b.images.shape == (len(b), channels, 12, 12)
        assert b.images.min() >= -1 and b.images.max() <= 1
    prompts = [p for b in batches for p in b.prompts]
    assert sorted(prompts) == sorted(s["caption"] for s in samples) and prompts != sorted(prompts)
    # a 16x16 image comes back exactly at resolution 16
    batches = _all(caption_shard_dataset(paths[0], batch_size=8, resolution=16, channels=channels,
                                         shuffle_buffer=0))
    u8 = ((batches[0].images[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    want = samples[0]["image"][:, :, None]
    np.testing.assert_array_equal(u8, want if channels == 1 else np.repeat(want, 3, axis=2))


def test_precomputed_latents_and_text_round_trip(tmp_path):
    samples = _samples(12, latent=True, text=True)
    paths = write_caption_shards(samples, tmp_path, maxcount=5)
    batches = _all(caption_shard_dataset(shard_pattern(paths), batch_size=4, resolution=16,
                                         shuffle_buffer=0))
    assert len(batches) == 3
    b = batches[1]
    assert b.images is None and b.prompts == [f"caption {i} ✓" for i in range(4, 8)]
    assert b.latents.dtype == torch.float32 and b.latents.shape == (4, 4, 2, 2)
    np.testing.assert_array_equal(b.latents.numpy(), np.stack([samples[i]["latent"]
                                                               for i in range(4, 8)]))
    assert sorted(b.text) == ["embeds", "mask", "pooled", "time_ids"]
    assert b.text["embeds"].shape == (4, 5, 8) and b.text["pooled"].dtype == torch.float32
    assert b.text["mask"].dtype == torch.bool and b.text["time_ids"].dtype == torch.int64
    for k in b.text:
        np.testing.assert_array_equal(b.text[k].numpy(),
                                      np.stack([samples[i]["text"][k] for i in range(4, 8)]))

    text_only = write_caption_shards(_samples(4, text=True), tmp_path / "t")
    b = next(caption_shard_dataset(text_only, batch_size=4, resolution=8))
    assert b.images.shape == (4, 3, 8, 8) and b.latents is None and b.text["embeds"].shape == (4, 5, 8)


def test_a_sample_of_another_kind_is_skipped_not_batched(tmp_path):
    samples = _samples(10, latent=True)
    del samples[2]["latent"]  # the odd one: an image, no latents
    samples[6]["latent"] = samples[6]["latent"][:, :1]  # another latent shape
    paths = write_caption_shards(samples, tmp_path)
    stream = caption_shard_dataset(paths, batch_size=4, resolution=16, shuffle_buffer=0)
    batches = _all(stream)
    assert [b.prompts for b in batches] == [[f"caption {i} ✓" for i in (0, 1, 3, 4)],
                                            [f"caption {i} ✓" for i in (5, 7, 8, 9)]]
    assert all(b.images is None and b.latents.shape == (4, 4, 2, 2) for b in batches)
    assert stream.skipped.count == 2
    assert "sample 00000002 (no latents, no text arrays) does not match" in stream.skipped.recent[0]
    assert "latents (4, 1, 2)" in stream.skipped.recent[1]


def _without_captions(src, dst, keys: set[str], empty: set[str] = frozenset()) -> None:
    def change(name, payload):
        key = name.split(".")[0]
        if name.endswith(".txt") and key in keys:
            return None
        return b"  \n" if name.endswith(".txt") and key in empty else payload
    _rewrite(src, dst, change)


def test_samples_without_caption_or_image_are_counted_and_skipped(tmp_path):
    paths = write_caption_shards(_samples(20), tmp_path / "ok", maxcount=20)
    bad = tmp_path / "bad-000000.tar"
    _without_captions(paths[0], bad, {"00000003", "00000011"}, empty={"00000007"})
    stream = caption_shard_dataset(bad, batch_size=5, resolution=16, shuffle_buffer=0)
    prompts = [p for b in _all(stream) for p in b.prompts]
    assert prompts == [f"caption {i} ✓" for i in range(20) if i not in (3, 7, 11)]
    assert stream.skipped.count == 3 and stream.skipped.by_type == {"ValueError": 3}
    assert all("no caption (.txt)" in m for m in stream.skipped.recent)
    assert "sample 00000007" in stream.skipped.recent[1]

    corrupt = write_corrupt_shard(paths[0], tmp_path / "corrupt-000000.tar")  # 00000005.png
    stream = caption_shard_dataset(corrupt, batch_size=5, resolution=16, shuffle_buffer=0)
    assert len([p for b in _all(stream) for p in b.prompts]) == 19
    assert stream.skipped.count == 1
    assert "sample 00000005: undecodable image .png" in stream.skipped.recent[0]


def test_a_stream_with_no_captions_at_all_stops_with_a_clear_error(tmp_path):
    paths = write_caption_shards(_samples(6), tmp_path / "ok")
    bad = tmp_path / "nocap-000000.tar"
    _without_captions(paths[0], bad, {f"{i:08d}" for i in range(6)})
    stream = caption_shard_dataset(bad, batch_size=2, resolution=16, max_consecutive_skips=20)
    with pytest.raises(RuntimeError) as err:
        next(stream)
    assert "20 shard errors in a row" in str(err.value)
    assert "no caption (.txt)" in str(err.value) and "every sample needs" in str(err.value)


def test_configuration_errors_fail_at_construction(tmp_path):
    paths = write_caption_shards(_samples(2), tmp_path)
    with pytest.raises(ValueError, match="channels must be 1 \\(grayscale\\) or 3 \\(RGB\\)"):
        caption_shard_dataset(paths, batch_size=2, resolution=16, channels=4)
    with pytest.raises(ValueError, match="resolution must be >= 1"):
        caption_shard_dataset(paths, batch_size=2, resolution=0)
    with pytest.raises(FileNotFoundError, match="1 of 1 shards not found"):
        caption_shard_dataset(tmp_path / "nope-000000.tar", batch_size=2, resolution=16)


# ----------------------------------------------------------------------- exact resume

RESUME_CASES = {
    "shuffled": dict(shuffle_buffer=12, seed=5),
    "ordered": dict(shuffle_buffer=0),
    "resampled": dict(resampled=True, epoch_samples=15, shuffle_buffer=8, seed=1),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_caption_stream_resumes_exactly(tmp_path, case):
    samples = _samples(27, latent=False, text=True)
    paths = write_caption_shards(samples, tmp_path / "ok", maxcount=7)
    # a shard with a missing caption: its skip is counted once, also across a restore
    _without_captions(paths[1], tmp_path / "cut.tar", {"00000009"})
    os.replace(tmp_path / "cut.tar", paths[1])
    make = lambda: caption_shard_dataset(shard_pattern(paths), batch_size=4,  # noqa: E731
                                         resolution=8, **RESUME_CASES[case])
    for k in (1, 4, 7):  # 26 good samples = 6.5 batches a pass: k and after cross passes
        original = make()
        for _ in range(k):
            next(original)
        state = copy.deepcopy(original.state_dict())
        skipped = original.skipped.count
        expected = [next(original) for _ in range(12)]
        restored = make()
        restored.load_state_dict(state)
        assert restored.skipped.count == skipped
        _same([next(restored) for _ in range(12)], expected)
        assert restored.skipped.count == original.skipped.count
    assert original.skipped.count >= 1
    pickle.dumps(original.dataset)  # hands over to DataLoader workers


# ---------------------------------------------------------------------------------- S3

def test_caption_stream_from_s3_equals_local(moto, tmp_path):
    paths = write_caption_shards(_samples(10, latent=True, text=True), tmp_path / "c", maxcount=4)
    s3.upload_dir(tmp_path / "c", f"s3://{BUCKET}/captions")
    remote = f"s3://{BUCKET}/captions/train-{{000000..000002}}.tar"
    make = lambda url: caption_shard_dataset(url, batch_size=3, resolution=16,  # noqa: E731
                                             shuffle_buffer=5, seed=2)
    _same(_all(make(remote)), _all(make(shard_pattern(paths))))


# -------------------------------------------------------------------------- entry script

def test_make_shards_writes_fashion_mnist_caption_shards(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "jobs" / "make_shards.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    images = np.full((12, 28, 28), 200, np.uint8)
    labels = np.arange(12) % 10
    monkeypatch.setattr(job, "load_fashion_mnist", lambda split, root=None: ImageSet(images, labels))
    for channels in (1, 3):
        out = tmp_path / f"c{channels}"
        job.main(["--kind", "captions", "--split", "test", "--out", str(out), "--maxcount", "5",
                  "--channels", str(channels)])
        pattern = capsys.readouterr().out.strip()
        assert pattern == str(out / "test-{000000..000002}.tar")
        batch = next(caption_shard_dataset(pattern, batch_size=12, resolution=32, channels=channels,
                                           shuffle_buffer=0))
        assert batch.prompts == [f"a photo of a {CLASS_NAMES[i % 10]}" for i in range(12)]
        assert batch.images.shape == (12, channels, 32, 32)
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False  # 28 -> 32: two black pixels on every side
        assert (batch.images[:, :, border] == -1).all()
        assert torch.allclose(batch.images[:, :, 2:30, 2:30], torch.tensor(200 / 127.5 - 1))

    # the precompute hook: per-batch (latents, text) stored with each sample
    def encode(imgs, captions):
        assert all(i.shape == (32, 32, 3) for i in imgs)
        return (np.stack([np.full((4, 4, 4), len(c), np.float16) for c in captions]),
                {"embeds": np.ones((len(imgs), 3, 2), np.float32)})
    args = job.argparse.Namespace(split="test", root=None, channels=3, out=tmp_path / "pre",
                                  maxcount=5)
    paths = job.make_captions(args, encode=encode)
    batch = next(caption_shard_dataset(paths, batch_size=12, resolution=32, shuffle_buffer=0))
    assert batch.images is None and batch.text["embeds"].shape == (12, 3, 2)
    assert batch.latents[0, 0, 0, 0] == len("a photo of a t-shirt/top")

    # varied captions, two passes with new captions each
    out = tmp_path / "varied"
    job.main(["--kind", "captions", "--split", "test", "--out", str(out), "--maxcount", "100",
              "--channels", "1", "--captions", "varied", "--repeat", "2", "--seed", "3"])
    batch = next(caption_shard_dataset(capsys.readouterr().out.strip(), batch_size=24, resolution=32, channels=1,
                                       shuffle_buffer=0))
    assert batch.images.shape == (24, 1, 32, 32)
    assert batch.prompts[:12] != batch.prompts[12:] and len(set(batch.prompts)) > 6
    assert all(any(w in p for w in SYNONYMS[y]) for y, p in zip(list(labels) * 2, batch.prompts))
