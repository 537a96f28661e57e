"""The trainer's data for text-to-image families.

- Data-free methods (SIM, DMD) read prompts only: ``data.prompts`` (a .txt / .jsonl / .parquet
  file, local or ``s3://``; hyperscale/data/prompts.py), or, when unset, the embedded default:
  the Fashion-MNIST class prompts "a photo of a {class}".
- Data methods (TSCD, CD, feedback) read captioned images: LAION-style caption shards
  (``data.train_shards_path_or_url``; hyperscale/data/captions.py), with precomputed latents
  and text embeddings used when the shards carry them, or, when unset, the embedded default:
  Fashion-MNIST padded to the teacher's image side, captioned with its class prompt.
Images are VAE-encoded here, once per batch, on the trainer's device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperscale.data.captions import CaptionBatch, caption_shard_dataset
from hyperscale.data.fashion_mnist import class_prompts, load_fashion_mnist
from hyperscale.data.prompts import PromptStream, load_prompts
from hyperscale.data.stream import InMemoryStream

DEFAULT_PROMPTS = tuple(class_prompts())  # "a photo of a {class}", in label order


def prompts_of(cfg) -> list[str]:
    return load_prompts(cfg.data.prompts) if cfg.data.prompts else list(DEFAULT_PROMPTS)


def grid_prompts(cfg, rows: int = 10) -> list[str]:
    """The sample grid's row prompts: ``rows`` prompts evenly spaced over the run's source (a
    prompt file grouped by subject shows one row per group, not ten phrasings of its first),
    cycled when the source has fewer."""
    prompts = prompts_of(cfg)
    if len(prompts) < rows:
        return [prompts[i % len(prompts)] for i in range(rows)]
    return [prompts[i * len(prompts) // rows] for i in range(rows)]


def image_side(model: nn.Module) -> int:
    from hyperscale.models.families import family_of

    return family_of(model).image_side(model)


def image_channels(model: nn.Module) -> int:
    from hyperscale.models.families import family_of

    return family_of(model).image_channels(model)


class CaptionedImages:
    """An in-memory labelled set as (images (B, C, S, S) in [-1, 1], prompts): padded with black
    (-1) to the side S, grey repeated to the VAE's channels; exactly resumable (its stream's cursor)."""

    def __init__(self, stream: InMemoryStream, side: int, channels: int):
        self.stream, self.side, self.channels = stream, side, channels

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, list[str]]:
        images, labels = next(self.stream)
        pad = self.side - images.shape[-1]
        if pad >= 0:
            images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
        else:
            images = F.interpolate(images, size=(self.side, self.side), mode="bilinear", antialias=True)
        images = images.expand(-1, self.channels, -1, -1) if images.shape[1] == 1 else images
        return images.contiguous(), [DEFAULT_PROMPTS[int(i)] for i in labels]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def text2image_stream(cfg, method, model: nn.Module, rank: int, world: int):
    d = cfg.data
    if method.batch == "conditions":
        return PromptStream(prompts_of(cfg), d.batch_size, rank, world, seed=cfg.run.seed)
    side = d.resolution or image_side(model)
    if d.train_shards_path_or_url:
        return caption_shard_dataset(d.train_shards_path_or_url, d.batch_size, resolution=side,
                                     channels=image_channels(model), seed=cfg.run.seed)
    images, labels = load_fashion_mnist(d.split, d.root).tensors()
    return CaptionedImages(InMemoryStream(images, labels, d.batch_size, rank, world, seed=cfg.run.seed), side,
                           image_channels(model))


def to_model_inputs(item, family, model: nn.Module, device: torch.device) -> tuple[Tensor | None, object, object]:
    """A stream's batch -> (x0 as the denoiser generates it, or None; the conditions to encode; the
    conditions as given: labels or prompts): images go through the family's VAE unless the batch
    carries latents; precomputed text embeddings replace the prompts for encoding."""
    if isinstance(item, CaptionBatch):
        x = item.latents if item.latents is not None else family.encode_images(model, item.images.to(device))
        return x, (item.text if item.text else item.prompts), item.prompts
    x, y = item
    if x is not None and family.condition == "text":
        x = family.encode_images(model, x.to(device))
    return x, y, y
