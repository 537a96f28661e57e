"""Fashion-MNIST from the standard IDX files (Xiao et al. 2017; MIT licence), and its
class names as text (prompts, captions) for the text-to-image data paths.

Default location is Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``); any directory holding the four
``*-idx?-ubyte[.gz]`` files works.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Caption / prompt templates; "{c}" is the class name. The first is the shards' caption.
PROMPT_TEMPLATES = ("a photo of a {c}", "a picture of a {c}", "a {c} on a plain background")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetMissingError(FileNotFoundError):
    pass


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(root: Path, stem: str) -> Path:
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise DatasetMissingError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in {root}. Install it with "
        f"'apt-get install dataset-fashion-mnist' (files land in {DEFAULT_ROOT}), or pass a "
        f"directory holding the standard IDX files (data.root=... or HYPERSCALE_FMNIST_ROOT).")


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (magic 0x0000 08 NDIM, big-endian dims, uint8 payload)."""
    with _open(path) as f:
        magic = f.read(4)
        if len(magic) != 4 or magic[:2] != b"\x00\x00" or magic[2] != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic!r})")
        ndim = magic[3]
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX payload ({data.size} bytes for dims {dims})")
    return data.reshape(dims)


@dataclass
class ImageSet:
    """uint8 images (N, 28, 28) and int64 labels (N,)."""
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Images as float in [-1, 1], shape (N, 1, 28, 28), and long labels."""
        return to_model_range(self.images), torch.from_numpy(self.labels.astype(np.int64))


def to_model_range(images_u8: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(images_u8)).float().div(127.5).sub(1.0).unsqueeze(1)


def to_uint8(x: Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> uint8 (N, H, W)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).cpu().numpy()


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ImageSet:
    if split not in _FILES:
        raise ValueError(f"unknown split '{split}'; allowed: {sorted(_FILES)}")
    root = Path(root or os.environ.get("HYPERSCALE_FMNIST_ROOT") or DEFAULT_ROOT)
    img_stem, lab_stem = _FILES[split]
    images, labels = read_idx(_find(root, img_stem)), read_idx(_find(root, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return ImageSet(images, labels.astype(np.int64))


def prompt_for(class_name: str) -> str:
    """The class's default prompt: the first template ("a photo of a {c}")."""
    return PROMPT_TEMPLATES[0].replace("{c}", class_name)


def class_prompts(templates: Sequence[str] = PROMPT_TEMPLATES[:1],
                  class_names: Sequence[str] = CLASS_NAMES) -> list[str]:
    """Every template filled with every class name, template by template."""
    if not templates or any("{c}" not in t for t in templates):
        raise ValueError(f"templates must be non-empty and each hold '{{c}}' for the class name, "
                         f"got {list(templates)}")
    return [t.replace("{c}", name) for t in templates for name in class_names]


def caption_samples(image_set: ImageSet, channels: int = 3, size: int = 32,
                    class_names: Sequence[str] = CLASS_NAMES, caption_fn=None, repeat: int = 1) -> Iterator[dict]:
    """Sample dicts for ``hyperscale.data.captions.write_caption_shards``: each image padded
    with black to ``size`` x ``size`` (28 -> 32: -1 in model range), grayscale (channels=1)
    or RGB (3); caption ``caption_fn(image, label)`` (default: ``PROMPT_TEMPLATES[0]`` of its class;
    varied captions: ``hyperscale.data.fmnist_captions.captioner``); meta its label and class.
    ``repeat``: passes over the set (each pass draws new captions)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    h, w = image_set.images.shape[1:]
    if size < max(h, w):
        raise ValueError(f"size {size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((top, size - h - top), (left, size - w - left))
    for _ in range(repeat):
        for image, label in zip(image_set.images, image_set.labels):
            name = class_names[int(label)]
            text = caption_fn(image, int(label)) if caption_fn is not None else prompt_for(name)
            image = np.pad(image, pad)  # zeros: black
            yield {"image": image if channels == 1 else np.repeat(image[:, :, None], 3, axis=2),
                   "caption": text, "meta": {"label": int(label), "class_name": name}}
