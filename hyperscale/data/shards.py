"""WebDataset shards for class-conditional image sets: writing and streaming; the shard
machinery (writing, URLs, the skip counter, the resumable stream) is shared with caption
shards (``hyperscale.data.captions``), which bring their own sample format.

Format (WebDataset, Aizman et al. 2019): POSIX tar files ``{prefix}-{000000}.tar``
holding ``maxcount`` samples each; one sample is the group of members that share a
key::

    00000042.png    the 28x28 grayscale image, PNG-encoded
    00000042.json   {"label": 3, "class_name": "dress", "prompt": "a photo of a dress"}
    00000042.txt    a photo of a dress

The key is the sample's zero-padded index in the source set.

Streaming (``shard_dataset``) gives an exactly resumable ``ShardStream``
(``hyperscale.data.stream``): per shard, the stages open (URL -> bytes), tar members,
group by key; then window shuffle, decode, batch. Shard URLs are local paths, ``file://``
or ``s3://`` URLs, or brace patterns of them (``s3://b/x/train-{000000..000003}.tar``);
every URL becomes bytes in ``open_shard`` (S3 through ``hyperscale.storage.s3``). Corrupt
or undecodable samples (and unreadable shard tails) are skipped and counted by a
``SkipCounter``, never fatal; only a stream that produces nothing but errors for
``max_consecutive_skips`` items in a row stops with an error, and an unreachable store
(after its retries) or missing credentials stop it at once.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch import Tensor
from webdataset.tariterators import group_by_keys, tar_file_expander

from hyperscale.storage import s3
from hyperscale.data.fashion_mnist import CLASS_NAMES, ImageSet, prompt_for, to_model_range
from hyperscale.data.stream import ShardStream
from hyperscale.storage.local import atomic_file

log = logging.getLogger(__name__)

KEY_DIGITS = 8           # sample keys: "00000042"
SHARD_DIGITS = 6         # shard names: "train-000003.tar"
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d+)\.tar$")
_TAR_MTIME = 0.0         # fixed member mtime: the same input gives byte-identical shards


# ----------------------------------------------------------------------------- writing

def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:0{SHARD_DIGITS}d}.tar"


def _encode_png(image_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_u8)).save(buf, format="PNG")
    return buf.getvalue()


def _encode_sample(index: int, image_u8: np.ndarray, label: int,
                   class_names: Sequence[str]) -> dict[str, str | bytes]:
    name = class_names[label]
    meta = {"label": label, "class_name": name, "prompt": prompt_for(name)}
    return {"__key__": f"{index:0{KEY_DIGITS}d}",
            "png": _encode_png(image_u8),
            "json": json.dumps(meta).encode("utf-8"),
            "txt": meta["prompt"].encode("utf-8")}


def _write_tar_atomically(path: Path, samples: Iterable[dict]) -> None:
    """Write one shard to a hidden temp file beside ``path``, then ``os.replace`` it in.

    Readers see either no shard or a complete one; on any error the temp file is removed.
    """
    with atomic_file(path, fsync=True) as tmp:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=_TAR_MTIME) as writer:
                for sample in samples:
                    writer.write(sample)


def write_shards(image_set: ImageSet, pattern_dir: str | os.PathLike, prefix: str = "train",
                 maxcount: int = 1000, class_names: Sequence[str] = CLASS_NAMES) -> list[Path]:
    """Write ``image_set`` (uint8 images (N, H, W), int labels (N,)) as WebDataset shards.

    Shard ``i`` holds samples ``[i * maxcount, (i + 1) * maxcount)`` in source order and is
    named ``{prefix}-{i:06d}.tar`` inside ``pattern_dir`` (created if missing). Each shard
    is written atomically. Returns the shard paths in order; ``shard_pattern(paths)``
    gives the brace pattern that streams them back.
    """
    images, labels = np.asarray(image_set.images), np.asarray(image_set.labels)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("cannot write shards from an empty image set")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}] but there are "
                         f"{len(class_names)} class names")
    return write_sharded((_encode_sample(i, images[i], int(labels[i]), class_names)
                          for i in range(len(images))), pattern_dir, prefix, maxcount)


def write_sharded(encoded: Iterable[dict], out_dir: str | os.PathLike, prefix: str,
                  maxcount: int) -> list[Path]:
    """Write encoded samples ({__key__, ext: bytes}) as shards of ``maxcount``, in order.

    Shard ``i`` is ``{prefix}-{i:06d}.tar`` in ``out_dir`` (created if missing), written
    atomically once its samples are encoded (``encoded`` is read lazily, one shard at a
    time). Returns the shard paths; no samples -> no shards.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out, samples, paths = Path(out_dir), iter(encoded), []
    out.mkdir(parents=True, exist_ok=True)
    for first in samples:  # each turn: the first sample of the next shard
        path = out / shard_name(prefix, len(paths))
        _write_tar_atomically(path, itertools.chain([first], itertools.islice(samples, maxcount - 1)))
        paths.append(path)
    return paths


def shard_pattern(paths: Sequence[str | os.PathLike]) -> str:
    """Brace pattern for consecutively numbered shards in one directory.

    ``[d/train-000000.tar, ..., d/train-000059.tar]`` -> ``"d/train-{000000..000059}.tar"``;
    a single shard gives its plain path.
    """
    if not paths:
        raise ValueError("no shard paths given")
    parsed = []
    for p in map(Path, paths):
        m = _SHARD_NAME.match(p.name)
        if m is None:
            raise ValueError(f"{p}: not a shard name of the form PREFIX-NNNNNN.tar")
        parsed.append((p.parent, m["prefix"], m["index"]))
    parent, prefix, first = parsed[0]
    width = len(first)
    for i, (d, pre, idx) in enumerate(parsed):
        if (d, pre, len(idx)) != (parent, prefix, width) or int(idx) != int(first) + i:
            raise ValueError("shards must share a directory and prefix and be numbered "
                             f"consecutively; {paths[i]} breaks the run")
    if len(parsed) == 1:
        return str(Path(paths[0]))
    return str(parent / f"{prefix}-{{{first}..{parsed[-1][2]}}}.tar")


# --------------------------------------------------------------------------- streaming

def expand_shard_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A URL, brace pattern or list of them -> the flat list of shard URLs, in order.

    Works the same for paths and ``s3://bucket/prefix/train-{000000..000003}.tar``.
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    return [u for pattern in urls for u in braceexpand(os.fspath(pattern))]


def _local_path(url: str) -> str | None:
    """Filesystem path for a local shard URL (plain path or file://), else None."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def open_shard(url: str) -> BinaryIO:
    """Open one shard URL as a binary stream: the single place URLs become bytes.

    Local paths, ``file://`` and ``s3://`` (streamed by ``hyperscale.storage.s3``, with
    retries and mid-object resume) are supported.
    """
    if s3.is_s3_url(url):
        return s3.open_object(url)
    path = _local_path(url)
    if path is None:
        raise ValueError(f"{url}: unsupported shard URL scheme (local paths, file:// and s3://)")
    return open(path, "rb")


class SkipCounter:
    """Exception handler for webdataset stages that counts, logs and skips.

    ``count`` is the number of skipped items (a sample that failed to decode, a shard
    that failed to open, or the unreadable rest of a truncated shard); ``by_type``
    splits it by exception type; ``recent`` keeps the last few messages. Raises once
    ``max_consecutive`` errors arrive with no good sample between them (a stream that
    is all errors would otherwise spin forever when shards are resampled). An
    unreachable store or missing S3 credentials are not data errors: they are re-raised.

    Counts live in the process that iterates: with DataLoader workers each worker
    counts its own.
    """
    FATAL = (s3.S3UnavailableError, s3.S3AccessError)

    def __init__(self, max_consecutive: int = 1000, log_first: int = 10):
        self.max_consecutive, self.log_first = max_consecutive, log_first
        self.count = 0
        self.consecutive = 0
        self.by_type: Counter[str] = Counter()
        self.recent: deque[str] = deque(maxlen=20)
        self._muted = False

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, self.FATAL):
            raise exn
        if self._muted:  # replaying data whose errors were counted before a restore
            return True
        self.count += 1
        self.consecutive += 1
        self.by_type[type(exn).__name__] += 1
        message = f"{type(exn).__name__}: {exn}"[:500]
        self.recent.append(message)
        if self.count <= self.log_first:
            log.warning("skipping corrupt shard data (%d so far): %s", self.count, message)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(f"{self.consecutive} shard errors in a row with no good sample; "
                               f"last: {message}") from exn
        return True  # webdataset: continue with the next item

    def reset_consecutive(self) -> None:
        self.consecutive = 0

    @contextmanager
    def muted(self, on: bool = True) -> Iterator[None]:
        old, self._muted = self._muted, on
        try:
            yield
        finally:
            self._muted = old

    def state_dict(self) -> dict:
        return {"count": self.count, "consecutive": self.consecutive, "by_type": dict(self.by_type)}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.consecutive = int(state["count"]), int(state["consecutive"])
        self.by_type = Counter(state["by_type"])


@dataclass
class Sample:
    """One decoded sample: uint8 image (H, W) and its class label."""
    key: str
    image: np.ndarray
    label: int


def decode_sample(sample: dict) -> Sample:
    """Raw webdataset sample {__key__, png, json, ...} -> Sample. Raises on anything corrupt."""
    image = Image.open(io.BytesIO(sample["png"]))
    image = np.asarray(image.convert("L") if image.mode != "L" else image, dtype=np.uint8)
    label = json.loads(sample["json"])["label"]
    if not isinstance(label, int) or isinstance(label, bool):
        raise ValueError(f"sample {sample['__key__']}: label {label!r} is not an int")
    return Sample(sample["__key__"], image, label)


def collate(samples: list[Sample]) -> tuple[Tensor, Tensor]:
    """Samples -> (images float in [-1, 1] (B, 1, H, W), labels long (B,))."""
    images = to_model_range(np.stack([s.image for s in samples]))
    return images, torch.tensor([s.label for s in samples], dtype=torch.long)


def _open_shards(shards: Iterable[dict], handler: SkipCounter) -> Iterator[dict]:
    """{url} -> {url, stream}; the stream is closed once its shard has been read."""
    for shard in shards:
        try:
            stream = open_shard(shard["url"])
        except OSError as exn:
            exn.args = exn.args + (shard["url"],)
            handler(exn)
            continue
        try:
            yield dict(shard, stream=stream)
        finally:
            stream.close()


def shard_samples(url: str, handler: SkipCounter) -> Iterator[dict]:
    """Raw samples {__key__, __url__, <extension>: bytes, ...} of one shard, in file order.

    Stages: open (URL -> bytes), tar members, grouped by key; errors go to ``handler``.
    """
    streams = _open_shards([{"url": url}], handler)
    return group_by_keys(tar_file_expander(streams, handler=handler), handler=handler)


def _check_shards(urls: list[str], split_by_node: bool, resampled: bool,
                  world_size: int) -> None:
    """Configuration mistakes fail at construction; only data errors are skipped later."""
    if not urls:
        raise ValueError("no shard URLs given")
    unsupported = [u for u in urls if not s3.is_s3_url(u) and _local_path(u) is None]
    if unsupported:
        raise ValueError(f"{unsupported[0]}: unsupported shard URL scheme "
                         f"(local paths, file:// and s3://)")
    remote = [u for u in urls if s3.is_s3_url(u)]
    missing = s3.missing_objects(remote) if remote else []
    missing += [u for u in urls if (p := _local_path(u)) is not None and not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards not found, "
                                f"e.g. {missing[0]}")
    if split_by_node and not resampled and world_size > len(urls):
        raise ValueError(f"{len(urls)} shards cannot be split over {world_size} ranks; "
                         f"write smaller shards (--maxcount) or use resampled=True")


def shard_dataset(urls: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int,
                  shuffle_buffer: int = 1000, seed: int = 0, resampled: bool = False,
                  epoch_samples: int | None = None, split_by_node: bool = True,
                  split_by_worker: bool = True, drop_last: bool = False,
                  max_consecutive_skips: int = 1000,
                  decode: Callable[[dict], Any] = decode_sample,
                  collate: Callable[[list], Any] = collate,
                  compatible: Callable[[Any, Any], None] | None = None) -> ShardStream:
    """Stream shards back as (images (B, 1, H, W) in [-1, 1], labels (B,)) batches, or
    in another sample format given by ``decode`` / ``collate`` / ``compatible`` (see
    ``ShardStream``; ``hyperscale.data.captions`` streams caption shards this way).

    urls: a path, ``s3://`` URL, brace pattern (``/x/train-{000000..000003}.tar``,
        ``s3://bucket/x/train-{000000..000003}.tar``) or a list of them.
    shuffle_buffer: samples held for shuffling (whole shards are read until at least
        this many are held); 0 keeps shard and sample order. Shard order and sample
        order are reshuffled every pass, deterministically from ``seed``.
    resampled: draw shards with replacement forever (each rank and loader worker with
        its own seed) instead of one pass; pair with ``epoch_samples``.
    epoch_samples: if set, an epoch is this many samples (rounded down to whole
        batches) per rank and loader worker, continuing through the shards (and on
        into the next pass) where the last epoch stopped.
    split_by_node: give each torch.distributed rank a disjoint subset of shards (ignored
        when resampled, where ranks draw independently).
    split_by_worker: the same across DataLoader workers.
    drop_last: drop the partial batch at the end of a pass (``iter`` only; ``next``
        never gives partial batches).
    decode, collate, compatible: the sample format (``ShardStream``); the defaults are
        this module's class-label samples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epoch_samples is not None and epoch_samples < batch_size:
        raise ValueError(f"epoch_samples ({epoch_samples}) must be at least "
                         f"batch_size ({batch_size})")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    urls = expand_shard_urls(urls)
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    _check_shards(urls, split_by_node, resampled, world_size)
    skipped = SkipCounter(max_consecutive=max_consecutive_skips)
    return ShardStream(urls, partial(shard_samples, handler=skipped), decode, collate,
                       skipped, batch_size, shuffle_buffer, seed, resampled, epoch_samples,
                       split_by_node, split_by_worker, drop_last, rank, world_size,
                       compatible=compatible)
