"""Build denoisers from config sections and save/load them as exports
(``model.safetensors`` + ``hyperscale_model.json``), loadable without the trainer or Ray.

A model source is a local directory, a hub id (resolved through huggingface_hub,
which honours HF_HUB_OFFLINE) or an ``s3://bucket/prefix`` (downloaded via boto3).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from hyperscale.diffusion.schedule import Schedule, schedule_from_config
from hyperscale.models.denoiser import BaseDenoiser
from hyperscale.models.families import family_named, family_of
from hyperscale.storage.local import atomic_dir

EXPORT_META = "hyperscale_model.json"
EXPORT_WEIGHTS = "model.safetensors"


def schedule_from_section(s) -> Schedule:
    return schedule_from_config(s.kind, s.num_train_timesteps, s.beta_start, s.beta_end)


def build_denoiser(model_section, schedule_section) -> BaseDenoiser:
    """A fresh denoiser of ``model.family``, or the exported one named by ``pretrained_teacher_model``."""
    if model_section.pretrained_teacher_model:
        return load_denoiser(model_section.pretrained_teacher_model)
    return family_named(model_section.family).fresh(model_section, schedule_from_section(schedule_section))


def save_denoiser(model: BaseDenoiser, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Atomic export: written to a temp dir beside the target, then renamed into place."""
    family = family_of(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "hyperscale-denoiser/1", "family": family.name} | family.describe(model) | {"extra": extra or {}}
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / EXPORT_WEIGHTS))
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
    return Path(directory)


def resolve_source(source: str) -> Path:
    """Local directory, ``s3://bucket/prefix`` or hub id -> local directory.

    An S3 export is downloaded once into the cache ($HYPERSCALE_CACHE_DIR or
    ~/.cache/hyperscale), atomically, and re-downloaded only when its objects change.
    """
    if source.startswith("s3://"):
        from hyperscale.storage.s3 import cached_download

        return cached_download(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise FileNotFoundError(f"model source '{source}' is neither an export directory, "
                                f"an s3:// prefix nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source))


def load_denoiser(source: str | os.PathLike, map_location: str = "cpu") -> BaseDenoiser:
    path = resolve_source(str(source))
    meta_path = path / EXPORT_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no {EXPORT_META}; not a hyperscale export")
    meta = json.loads(meta_path.read_text())
    # exports written before families were named carry only the adapter of the class UNet
    name = meta.get("family") or {"class_unet2d": "class_unet"}.get(meta.get("adapter"))
    if name is None:
        raise ValueError(f"{path}: unsupported adapter {meta.get('adapter')!r}")
    model = family_named(name).from_description(meta)
    model.load_state_dict(load_file(str(path / EXPORT_WEIGHTS), device=map_location))
    return model.eval()
