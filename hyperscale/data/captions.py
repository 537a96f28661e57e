"""Caption shards (LAION-style WebDataset) for text-to-image methods that train on data
(TSCD, consistency distillation, reward feedback): writing and streaming.

One sample is the group of tar members sharing a key (``hyperscale.data.shards`` gives the
container, its writing and its exactly resumable streaming; this module the sample format)::

    00000042.png         the image (.jpg/.jpeg/.png/.webp; RGB or grayscale, any size)
    00000042.txt         its caption, UTF-8 (required, non-empty)
    00000042.json        metadata (optional; not read by the stream)
    00000042.latent.npy  precomputed VAE latents (C, h, w), float16/32, already scaled (optional)
    00000042.text.npz    precomputed text-encoder outputs (optional): ``embeds`` (L, D),
                         ``pooled`` (D'), ``mask`` (L,), any others (``time_ids`` (6,), ...)

``caption_shard_dataset`` yields ``CaptionBatch``: the prompts, the images converted to
``channels``, resized (short side to ``resolution``, bicubic, antialiased) and centre-cropped
to ``resolution`` x ``resolution`` in [-1, 1]; and the precomputed arrays where the
samples carry them. A sample with latents is not image-decoded (the latents replace it),
so such a batch has ``images=None``.

Batch rule: every sample of a batch has the kind of the batch's first sample (latents or
not, the same latent shape, the same text arrays and shapes), so that each field stacks.
A sample of another kind is skipped and counted by the stream's ``SkipCounter`` as a bad
record (a shard set should be written with one kind throughout). Bad records (no caption,
an undecodable image or array) are skipped and counted the same way.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hyperscale.data.shards import KEY_DIGITS, _encode_png, shard_dataset, write_sharded
from hyperscale.data.stream import ShardStream

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the first present is the sample's image
LATENT_EXT, TEXT_EXT = "latent.npy", "text.npz"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member time in .npz: deterministic shard bytes


@dataclass
class CaptionBatch:
    """One batch of caption samples (B of them).

    prompts: the captions; images: (B, channels, resolution, resolution) float in [-1, 1],
    None when every sample carries latents; latents: (B, C, h, w) float32 from
    ``.latent.npy``, else None; text: the ``.text.npz`` arrays stacked on a new first axis
    (floating ones as float32, others as stored), else None.
    """
    prompts: list[str]
    images: Tensor | None
    latents: Tensor | None
    text: dict[str, Tensor] | None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class CaptionSample:
    """One decoded sample: image uint8 (res, res, channels) unless latents replace it."""
    key: str
    caption: str
    image: np.ndarray | None
    latent: np.ndarray | None
    text: dict[str, np.ndarray] | None

    def kind(self) -> tuple:
        """What must agree across a batch for its fields to stack."""
        return (None if self.latent is None else self.latent.shape,
                None if self.text is None else tuple(sorted((k, v.shape) for k, v in self.text.items())))


# ----------------------------------------------------------------------------- writing

def _encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """Like ``np.savez`` (``np.load`` reads it) but with fixed member times and order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(arrays):
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME),
                       _encode_npy(np.asarray(arrays[name])))
    return buf.getvalue()


def _check_array(array, what: str, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == object:
        raise ValueError(f"{where}: {what} is an object array; store numbers only")
    return array


def encode_caption_sample(index: int, sample: dict) -> dict[str, bytes]:
    """A sample dict (``write_caption_shards``) -> its tar members. Raises on bad input."""
    where = f"sample {index}"
    unknown = set(sample) - {"image", "caption", "meta", "latent", "text"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; accepted: image, caption, "
                         f"meta, latent, text")
    image, caption = np.asarray(sample.get("image")), sample.get("caption")
    if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"{where}: image must be uint8 (H, W) or (H, W, 3), got "
                         f"{image.dtype} {image.shape}")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: caption must be a non-empty string, got {caption!r}")
    out = {"__key__": f"{index:0{KEY_DIGITS}d}", "png": _encode_png(image),
           "txt": caption.encode("utf-8")}
    if sample.get("meta") is not None:
        out["json"] = json.dumps(sample["meta"]).encode("utf-8")
    if sample.get("latent") is not None:
        latent = _check_array(sample["latent"], "latent", where)
        if latent.ndim != 3 or latent.dtype not in (np.float16, np.float32):
            raise ValueError(f"{where}: latent must be float16/float32 (C, h, w), got "
                             f"{latent.dtype} {latent.shape}")
        out[LATENT_EXT] = _encode_npy(latent)
    if sample.get("text") is not None:
        text = sample["text"]
        if not isinstance(text, dict) or not text or not all(isinstance(k, str) and k.isidentifier()
                                                            for k in text):
            raise ValueError(f"{where}: text must be a non-empty dict of arrays with "
                             f"identifier names (embeds, pooled, mask, ...)")
        out[TEXT_EXT] = _encode_npz({k: _check_array(v, f"text[{k!r}]", where) for k, v in text.items()})
    return out


def precompute(samples: Iterable[dict], encode: Callable, batch_size: int = 64) -> Iterator[dict]:
    """Add precomputed fields to sample dicts, a batch at a time: the hook for storing VAE
    latents and text embeddings with the shards (the model layer supplies ``encode``).

    ``encode(images, captions)`` gets a list of uint8 images and their captions and returns
    ``(latents, text)``: latents (B, C, h, w) or None, text a dict of (B, ...) arrays or None.
    """
    samples = iter(samples)
    while batch := [s for _, s in zip(range(batch_size), samples)]:
        latents, text = encode([np.asarray(s["image"]) for s in batch], [s["caption"] for s in batch])
        for i, s in enumerate(batch):
            extra = {} if latents is None else {"latent": np.asarray(latents[i])}
            if text is not None:
                extra["text"] = {k: np.asarray(v[i]) for k, v in text.items()}
            yield {**s, **extra}


def write_caption_shards(samples: Iterable[dict], out_dir: str | os.PathLike,
                         prefix: str = "train", maxcount: int = 1000,
                         encode: Callable | None = None, encode_batch: int = 64) -> list[Path]:
    """Write caption samples as WebDataset shards ``{prefix}-{i:06d}.tar`` in ``out_dir``.

    Each sample is a dict: ``image`` (uint8 (H, W) or (H, W, 3), stored as PNG), ``caption``
    (str), optional ``meta`` (dict, stored as .json), ``latent`` (float16/32 (C, h, w)) and
    ``text`` (dict of arrays, stored as .text.npz). With ``encode`` (see ``precompute``) the
    latents and text arrays are computed here, ``encode_batch`` samples at a time. Sample
    keys are the running index; each shard is written atomically, and the same samples
    give byte-identical shards. Returns the shard paths in order.
    """
    if encode is not None:
        samples = precompute(samples, encode, encode_batch)
    paths = write_sharded((encode_caption_sample(i, s) for i, s in enumerate(samples)),
                          out_dir, prefix, maxcount)
    if not paths:
        raise ValueError("cannot write caption shards from no samples")
    return paths


# --------------------------------------------------------------------------- streaming

def load_image(data: bytes, resolution: int, channels: int) -> np.ndarray:
    """Encoded image -> uint8 (resolution, resolution, channels): converted to RGB or L,
    short side resized to ``resolution`` (bicubic, antialiased), centre-cropped."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB" if channels == 3 else "L")
    w, h = image.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)  # Pillow filters over the whole footprint
        w, h = size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels)


def _load_npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def decode_caption_sample(raw: dict, resolution: int, channels: int) -> CaptionSample:
    """Raw webdataset sample -> CaptionSample. Raises ValueError (naming the key) on anything
    missing or corrupt; the stream counts and skips it."""
    key = raw.get("__key__")
    caption = raw["txt"].decode("utf-8").strip() if raw.get("txt") is not None else ""
    if not caption:
        raise ValueError(f"sample {key}: no caption (.txt); every sample needs a non-empty "
                         f"UTF-8 caption")
    latent = text = image = None
    if LATENT_EXT in raw:
        latent = _load_npy(raw[LATENT_EXT])
        if latent.ndim != 3 or latent.dtype.kind != "f":
            raise ValueError(f"sample {key}: .{LATENT_EXT} must be a float array (C, h, w), got "
                             f"{latent.dtype} {latent.shape}")
        latent = latent.astype(np.float32)
    if TEXT_EXT in raw:
        with np.load(io.BytesIO(raw[TEXT_EXT]), allow_pickle=False) as npz:
            text = {k: npz[k] for k in npz.files}
        if not text:
            raise ValueError(f"sample {key}: .{TEXT_EXT} holds no arrays")
    if latent is None:
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise ValueError(f"sample {key}: no image (.{', .'.join(IMAGE_EXTS)}) and no "
                             f".{LATENT_EXT}")
        try:
            image = load_image(raw[ext], resolution, channels)
        except Exception as exn:  # noqa: BLE001 - PIL raises many types for bad data
            raise ValueError(f"sample {key}: undecodable image .{ext} ({type(exn).__name__}: "
                             f"{exn})") from exn
    return CaptionSample(key, caption, image, latent, text)


def check_same_kind(first: CaptionSample, sample: CaptionSample) -> None:
    """The batch rule: ``sample`` may join a batch only if it has its first sample's kind."""
    if sample.kind() != first.kind():
        def describe(s: CaptionSample) -> str:
            latent = "no latents" if s.latent is None else f"latents {s.latent.shape}"
            text = "no text arrays" if s.text is None else \
                "text " + ", ".join(f"{k} {v.shape}" for k, v in sorted(s.text.items()))
            return f"{latent}, {text}"
        raise ValueError(f"sample {sample.key} ({describe(sample)}) does not match its batch "
                         f"({describe(first)}); write every sample of a shard set with the same "
                         f"precomputed fields")


def _as_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array.astype(np.float32) if array.dtype.kind == "f" else array)


def collate_captions(samples: Sequence[CaptionSample]) -> CaptionBatch:
    """Samples of one kind -> CaptionBatch."""
    first = samples[0]
    images = None
    if first.latent is None:
        u8 = torch.from_numpy(np.stack([s.image for s in samples]))  # (B, H, W, C)
        images = u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    latents = None if first.latent is None else torch.from_numpy(np.stack([s.latent for s in samples]))
    text = None if first.text is None else \
        {k: _as_tensor(np.stack([s.text[k] for s in samples])) for k in sorted(first.text)}
    return CaptionBatch([s.caption for s in samples], images, latents, text)


def caption_shard_dataset(urls: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int,
                          resolution: int, channels: int = 3, seed: int = 0,
                          shuffle_buffer: int = 1000, resampled: bool = False,
                          epoch_samples: int | None = None, split_by_node: bool = True,
                          split_by_worker: bool = True, drop_last: bool = False,
                          max_consecutive_skips: int = 1000) -> ShardStream:
    """Stream caption shards as ``CaptionBatch`` es; an exactly resumable ``ShardStream``.

    resolution, channels: the images' side after resize and centre crop, and 3 (RGB) or 1
    (grayscale). The other knobs are ``shard_dataset``'s (local, file:// and s3:// URLs or
    brace patterns; window shuffle; resampling; rank and loader-worker split).
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return shard_dataset(urls, batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                         resampled=resampled, epoch_samples=epoch_samples,
                         split_by_node=split_by_node, split_by_worker=split_by_worker,
                         drop_last=drop_last, max_consecutive_skips=max_consecutive_skips,
                         decode=partial(decode_caption_sample, resolution=resolution,
                                        channels=channels),
                         collate=collate_captions, compatible=check_same_kind)
