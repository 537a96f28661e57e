"""Build denoisers from config sections and save/load them as exports, loadable without the
trainer or Ray: ``hyperscale_model.json`` (family, sampler, method notes) beside the family's
weights (``model.safetensors`` for pixel families, a diffusers pipeline folder for text-to-image
ones) and a model card (README.md).

A model source is a local directory (an export or a diffusers pipeline folder), a hub id
(resolved through huggingface_hub, which honours HF_HUB_OFFLINE), an ``s3://bucket/prefix``
(downloaded via boto3) or ``tiny:<family>`` (a tiny random pipeline built from config, for
tests and the ``*-tiny`` presets; models/families/tiny.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hyperscale.diffusion.schedule import Schedule, schedule_from_config
from hyperscale.models.denoiser import BaseDenoiser
from hyperscale.models.card import model_card
from hyperscale.models.families import FAMILIES, family_named, family_of
from hyperscale.models.families.text2image import PIPELINE_INDEX, pipeline_class_name, quiet_libraries
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
    meta = {"format": "hyperscale-denoiser/1", "family": family.name} | family.describe(model) | {"extra": extra or {}}
    with atomic_dir(directory) as tmp:
        family.save(model, tmp, extra or {})
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
        (tmp / "README.md").write_text(model_card(meta, tmp))
    return Path(directory)


def set_sampler(directory: str | os.PathLike, extra: dict) -> None:
    """Rewrite an export's sampler in place (metadata ``extra``, model card and, for a pipeline
    folder, the scheduler that reproduces it): the Hyper-SD pipeline's unified export."""
    directory = Path(directory)
    meta = json.loads((directory / EXPORT_META).read_text()) | {"extra": extra}
    family = family_named(meta.get("family") or "class_unet")
    if (directory / PIPELINE_INDEX).is_file() and hasattr(family, "export_scheduler"):
        scheduler = family.export_scheduler(family.load(directory, meta), extra)
        scheduler.save_pretrained(str(directory / "scheduler"))
        index = json.loads((directory / PIPELINE_INDEX).read_text())
        index["scheduler"] = ["diffusers", type(scheduler).__name__]  # the class from_pretrained builds
        (directory / PIPELINE_INDEX).write_text(json.dumps(index, indent=2))
    (directory / EXPORT_META).write_text(json.dumps(meta, indent=1))
    (directory / "README.md").write_text(model_card(meta, directory))


def tiny_pipeline_dir(name: str) -> Path:
    """``tiny:<family>``: the family's tiny random pipeline, built once into the cache (under a
    lock: Ray workers of one node may ask at the same time)."""
    import fcntl

    from hyperscale.storage.s3 import CACHE_ENV

    family = family_named(name)
    if not hasattr(family, "tiny_pipeline"):
        raise ValueError(f"tiny:{name}: family {name} has no tiny test pipeline")
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hyperscale") / "tiny"
    target = root / f"{name}-v1"
    if (target / PIPELINE_INDEX).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / PIPELINE_INDEX).is_file():
            quiet_libraries()
            with atomic_dir(target) as tmp:
                family.tiny_pipeline().save_pretrained(str(tmp))
    return target


def resolve_source(source: str) -> Path:
    """Local directory, ``s3://bucket/prefix`` or hub id -> local directory.

    An S3 export is downloaded once into the cache ($HYPERSCALE_CACHE_DIR or
    ~/.cache/hyperscale), atomically, and re-downloaded only when its objects change.
    """
    if source.startswith("s3://"):
        from hyperscale.storage.s3 import cached_download

        return cached_download(source)
    if source.startswith("tiny:"):
        return tiny_pipeline_dir(source[len("tiny:"):])
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise FileNotFoundError(f"model source '{source}' is neither an export or pipeline directory, "
                                f"an s3:// prefix, tiny:<family> nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source))
    except Exception as err:  # offline, unknown repo, no access: say which and how to fix it
        raise FileNotFoundError(f"model source '{source}': could not fetch it from the Hugging Face hub "
                                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); offline "
                                f"(HF_HUB_OFFLINE) or no network: download it once and pass the local folder "
                                f"or an s3:// copy") from None


def load_denoiser(source: str | os.PathLike, map_location: str = "cpu") -> BaseDenoiser:
    path = resolve_source(str(source))
    meta_path = path / EXPORT_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        # exports written before families were named carry only the adapter of the class UNet
        name = meta.get("family") or {"class_unet2d": "class_unet"}.get(meta.get("adapter"))
        if name is None:
            raise ValueError(f"{path}: unsupported adapter {meta.get('adapter')!r}")
        return family_named(name).load(path, meta).to(map_location).eval()
    if (path / PIPELINE_INDEX).is_file():
        return family_for_pipeline(path).load(path, None).to(map_location).eval()
    raise FileNotFoundError(f"{path}: neither a hyperscale export (no {EXPORT_META}) nor a diffusers pipeline "
                            f"folder (no {PIPELINE_INDEX})")


def family_for_pipeline(path: Path):
    """The family whose pipeline class a diffusers folder holds."""
    cls = pipeline_class_name(path)
    for family in FAMILIES.values():
        if cls in getattr(family, "pipeline_classes", ()):
            return family
    known = sorted(c for f in FAMILIES.values() for c in getattr(f, "pipeline_classes", ()))
    raise ValueError(f"{path}: a {cls}, which no model family handles (known pipelines: {', '.join(known)})")
