"""Text-to-image latent families: a diffusers pipeline folder is the unit of loading and export.

A teacher is any diffusers pipeline of the family's class: a local folder, a hub id, an
``s3://`` prefix (``models.build.resolve_source``) or ``tiny:<family>`` (a tiny random pipeline
built from config, ``families/tiny.py``). It splits in two:

- the **denoiser** (``T2IDenoiser``): the pipeline's UNet or transformer, trained, copied into
  the student and fake-score roles, wrapped by LoRA and DeepSpeed like any denoiser;
- the **frontend** (``Frontend``): tokenizers, text encoders and the VAE, frozen, loaded once per
  process and shared by every copy of the denoiser (``deepcopy`` returns it, it is not a
  submodule, so it is never trained, sharded or checkpointed). Prompts become a ``Cond`` through
  the pipeline's own ``encode_prompt`` (training and inference agree by construction), once per
  prompt: embeddings are cached by prompt text. The null condition for CFG is what the pipeline
  uses for an empty negative prompt (SDXL's zeros when ``force_zeros_for_empty_prompt``).

Exports are pipeline folders (``save_pretrained`` with the student's network in place of the
teacher's and the scheduler that reproduces the method's sampler, ``export_scheduler``), plus
``hyperscale_model.json``; docs/families.md has the layout and the sampler per method.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from hyperscale.diffusion.schedule import DiscreteVP, Prediction, Schedule
from hyperscale.models.cond import Cond, as_cond
from hyperscale.models.denoiser import BaseDenoiser, unwrap
from hyperscale.models.families.external import external_components, load_external, write_external
from hyperscale.models.family import Family, feature_hooks

PIPELINE_INDEX = "model_index.json"
DIFFUSERS_PREDICTION = {"epsilon": Prediction.eps, "v_prediction": Prediction.v, "sample": Prediction.x0}
DEFAULT_PROMPT_CACHE = 4096  # prompts whose embeddings stay cached per process


def quiet_libraries() -> None:
    """diffusers / transformers progress bars and advisory warnings off (loading bars per component,
    "torchvision not installed", fp32-module hints): the console shows hyperscale's own progress.
    HYPERSCALE_LIBRARY_LOGS=1 keeps them."""
    import os

    if os.environ.get("HYPERSCALE_LIBRARY_LOGS") == "1":
        return
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


class Frontend:
    """The frozen tokenizers, text encoders and VAE of one pipeline folder (module docstring)."""

    def __init__(self, family: "TextToImageFamily", path: Path, sample_size: int, pipe=None):
        self.family, self.path = family, Path(path)
        self.sample_size = int(sample_size)  # the network's latent side (SDXL's time ids need the image size)
        self._pipe = pipe
        self._cache: OrderedDict[str, Cond] = OrderedDict()
        self._null: Cond | None = None
        self.cache_size = DEFAULT_PROMPT_CACHE
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def __deepcopy__(self, memo) -> "Frontend":
        return self  # frozen and shared by every copy of the denoiser

    @property
    def pipe(self):
        """The pipeline without its denoiser (loaded on first use), every part frozen in eval mode."""
        if self._pipe is None:
            quiet_libraries()
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(str(self.path), **{self.family.backbone_name: None},
                                                     **load_external(self.path))
            self._pipe = self.family.check_pipeline(pipe, self.path)
            self._pipe.frontend_sample_size = self.sample_size
            self._freeze()
        return self._pipe

    def stored(self):
        """A fresh copy of the pipeline without its denoiser, as stored (dtype included): what exports
        write when the live frontend was cast to bf16/fp16 for training."""
        from diffusers import DiffusionPipeline

        quiet_libraries()
        return DiffusionPipeline.from_pretrained(str(self.path), **{self.family.backbone_name: None},
                                                 **load_external(self.path))

    def _freeze(self) -> None:
        for _name, part in self._pipe.components.items():
            if isinstance(part, nn.Module):
                part.requires_grad_(False).eval().to(self.device, self.dtype)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Frontend":
        """Move the text encoders and VAE (``dtype``: bf16/fp16 where asked); cached embeddings stay on the CPU."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        if self._pipe is not None:
            self._freeze()
        return self

    @property
    def vae(self):
        return self.pipe.vae

    # ---------------------------------------------------------------- conditions
    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device=None) -> Cond:
        """One Cond row per prompt, from the cache or the text encoders (each new prompt once)."""
        prompts = [str(p) for p in prompts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            fresh = self.family.encode_prompts(self.pipe, missing, self.device).to("cpu", torch.float32)
            for i, p in enumerate(missing):
                self._cache[p] = fresh[i:i + 1]
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return Cond.cat(rows).to(device)

    @torch.no_grad()
    def null(self, n: int, device=None) -> Cond:
        if self._null is None:
            self._null = self.family.null_prompt(self.pipe, self.device).to("cpu", torch.float32)
        return Cond.cat([self._null] * n).to(device)

    # ---------------------------------------------------------------- latents
    def _scale_shift(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents, as the pipelines' training scripts do
        (a sample of the posterior, times the scaling factor after the shift)."""
        scale, shift = self._scale_shift()
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return ((dist.sample(generator) - shift) * scale).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] (unclamped), as the pipelines decode."""
        scale, shift = self._scale_shift()
        return self.vae.decode(latents.to(self.device, self.dtype) / scale + shift).sample.float()


def drop_source_paths(directory) -> None:
    """diffusers writes ``_name_or_path`` (where each part was loaded from: a path on the
    training machine) into the folder's configs; an export names no machine paths."""
    for path in [Path(directory) / "model_index.json", *Path(directory).glob("*/config.json")]:
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class T2IDenoiser(BaseDenoiser):
    """The pipeline's UNet / transformer behind the ``Denoiser`` protocol; ``frontend`` is shared."""

    def __init__(self, family: "TextToImageFamily", schedule: Schedule, prediction_type: Prediction | str,
                 net: nn.Module, frontend: Frontend):
        super().__init__(schedule, prediction_type)
        self.family_name = family.name
        self.net = net
        self.frontend = frontend  # a plain attribute: not a submodule, never trained or saved

    @property
    def family(self) -> "TextToImageFamily":
        from hyperscale.models.families import family_named

        return family_named(self.family_name)

    def null_cond(self, cond) -> Cond:
        cond = as_cond(cond)
        return self.frontend.null(len(cond), cond.device)

    def raw(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        cond = as_cond(cond)
        if cond is None:
            cond = self.frontend.null(x_t.shape[0], x_t.device)
        return self.family.call(self.net, x_t, t, cond.to(x_t.device, x_t.dtype))


def inner(denoiser: nn.Module) -> T2IDenoiser:
    found = unwrap(denoiser, lambda m: isinstance(m, T2IDenoiser))
    if found is None:
        raise TypeError(f"{type(denoiser).__name__} is not a text-to-image denoiser")
    return found


def pipeline_class_name(path: Path) -> str | None:
    index = Path(path) / PIPELINE_INDEX
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


class TextToImageFamily(Family):
    """Shared machinery of the latent text-to-image families; a family names its pipeline and
    network classes and implements ``encode_prompts``, ``null_prompt`` and ``call``."""
    condition = "text"
    bounded = False  # latents are not clamped; decoded images are
    backbone_name: ClassVar[str] = "unet"  # the pipeline component trained (and LoRA's key prefix)
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # diffusers pipeline class names of this family

    @property
    def lora_prefix(self) -> str:  # type: ignore[override]
        return self.backbone_name

    @property
    def denoiser_class(self):  # type: ignore[override]
        return T2IDenoiser

    def owns(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, T2IDenoiser) and denoiser.family_name == self.name

    # ---------------------------------------------------------------- what a family implements
    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        raise NotImplementedError

    def null_prompt(self, pipe, device) -> Cond:
        """The condition the pipeline uses for an empty negative prompt, one row."""
        raise NotImplementedError

    def call(self, net: nn.Module, x_t: Tensor, model_t: Tensor, cond: Cond) -> Tensor:
        """The network's raw prediction at its own timestep."""
        raise NotImplementedError

    def schedule_of(self, scheduler_config: dict, net: nn.Module, latent_size: int) -> Schedule:
        """The training noise schedule a scheduler config describes (``latent_size``: the latent
        side the pipeline generates at, for resolution-dependent schedules)."""
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        ddpm = DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config})
        return DiscreteVP(ddpm.alphas_cumprod.double())

    def prediction_of(self, scheduler_config: dict) -> Prediction:
        kind = scheduler_config.get("prediction_type", "epsilon")
        if kind not in DIFFUSERS_PREDICTION:
            raise ValueError(f"scheduler prediction_type {kind!r} is not supported for {self.name}")
        return DIFFUSERS_PREDICTION[kind]

    def tiny_pipeline(self):
        """A tiny random pipeline of this family, from config (families/tiny.py)."""
        raise NotImplementedError

    def latent_size(self, net: nn.Module, path: Path) -> int:
        """The latent side the pipeline generates at by default: the network's ``sample_size``."""
        size = net.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    # ---------------------------------------------------------------- loading
    def check_pipeline(self, pipe, path: Path):
        name = type(pipe).__name__
        if name not in self.pipeline_classes:
            raise ValueError(f"{path} holds a {name}, not a {self.name} pipeline "
                             f"({' / '.join(self.pipeline_classes)}); check model.family")
        return pipe

    def load_pipeline_denoiser(self, path: Path) -> T2IDenoiser:
        """The denoiser of a diffusers pipeline folder; the frontend loads lazily from the same folder."""
        import importlib

        quiet_libraries()
        path = Path(path)
        cls_name = pipeline_class_name(path)
        if cls_name not in self.pipeline_classes:
            raise ValueError(f"{path} holds a {cls_name}, not a {self.name} pipeline "
                             f"({' / '.join(self.pipeline_classes)}); check model.family")
        index = json.loads((path / PIPELINE_INDEX).read_text())
        library, cls = index[self.backbone_name]
        net_cls = getattr(importlib.import_module(library), cls)
        net = net_cls.from_pretrained(str(path / self.backbone_name)).eval()
        sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        size = self.latent_size(net, path)
        return T2IDenoiser(self, self.schedule_of(sched_cfg, net, size), self.prediction_of(sched_cfg), net,
                           Frontend(self, path, size))

    def load(self, path: Path, meta: dict | None) -> nn.Module:  # models.build.load_denoiser
        den = self.load_pipeline_denoiser(path)
        if meta is not None and "prediction_type" in meta:
            den.prediction_type = Prediction(meta["prediction_type"])
        return den

    def fresh(self, model_section: Any, schedule) -> nn.Module:
        """The network of ``model.pretrained_teacher_model`` with new random weights (its config, its
        frontend, its schedule): what training a teacher from scratch starts from."""
        source = getattr(model_section, "pretrained_teacher_model", None)
        if not source:
            raise ValueError(f"family {self.name} builds a fresh network from a pipeline's config: set "
                             f"model.pretrained_teacher_model (a diffusers folder, hub id, s3:// prefix, or "
                             f"tiny:{self.name})")
        from hyperscale.models.build import resolve_source

        den = self.load_pipeline_denoiser(resolve_source(source))
        den.net = type(den.net).from_config(den.net.config).train()
        return den

    # ---------------------------------------------------------------- exports
    def export_scheduler(self, denoiser: T2IDenoiser, extra: dict):
        """The diffusers scheduler whose pipeline call reproduces the export's sampler (models/export.py):
        - a 1-step call at t: Euler at the single VE level sigma~_t (Karras sigmas with sigma_min =
          sigma_max); "trailing" spacing starts from sigma~ z, which the pipeline feeds the network as
          sigma~ z / sqrt(1 + sigma~^2) = sigma_t z (SIM's x_t = sigma_t z), "leading" from
          sqrt(1 + sigma~^2) z, fed as z (DMD's x_t = z);
        - a few-step sampler: TCD (pass ``eta``) or DDIM with its spacing, abar = 1 at the end; a
          multi-step (unified) export without one: TCD;
        - nothing declared: the teacher's scheduler."""
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, TCDScheduler

        from hyperscale.models.export import SamplerSpec

        base = dict(denoiser.frontend.pipe.scheduler.config)
        keep = {k: base[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                                     "rescale_betas_zero_snr") if k in base}
        keep["prediction_type"] = {v: k for k, v in DIFFUSERS_PREDICTION.items()}[denoiser.prediction_type]
        spec = SamplerSpec.from_extra(extra)
        if spec.is_one_step_generator:
            call = spec.one_step
            s = float(denoiser.schedule.sigma_ve(torch.tensor([call.timestep]))[0])
            return EulerDiscreteScheduler(**keep, use_karras_sigmas=True, sigma_min=s, sigma_max=s, steps_offset=1,
                                          timestep_spacing="trailing" if call.noise_input.value == "sigma" else "leading",
                                          final_sigmas_type="zero")
        if spec.few_step is not None:
            # steps_offset 1: SD pipelines rewrite any other value; TCD and trailing DDIM do not read it
            if spec.few_step.name == "tcd":
                return TCDScheduler(**keep, steps_offset=1)
            return DDIMScheduler(**keep, timestep_spacing=spec.few_step.spacing, set_alpha_to_one=True, clip_sample=False,
                                 steps_offset=1)
        if spec.multi_step:  # Hyper-SD's unified LoRA: TCD at any step count
            return TCDScheduler(**keep, steps_offset=1)
        return denoiser.frontend.pipe.scheduler

    def save(self, denoiser: nn.Module, directory, extra: dict) -> None:
        """The teacher's pipeline folder with this network and the sampler's scheduler."""
        d = inner(denoiser)
        # the frozen parts as the teacher stored them, not as cast for training
        pipe = d.frontend.pipe if d.frontend.dtype == torch.float32 else d.frontend.stored()
        old = pipe.scheduler
        scheduler = self.export_scheduler(d, extra)
        external = external_components(d.frontend.path)  # loaded from their package: not written
        kept = {name: getattr(pipe, name) for name in external}
        pipe.register_modules(**{self.backbone_name: d.net, "scheduler": scheduler}, **dict.fromkeys(external))
        try:
            pipe.save_pretrained(str(directory), safe_serialization=True)
            write_external(directory, external)
            drop_source_paths(directory)
        finally:
            pipe.register_modules(**{self.backbone_name: None, "scheduler": old}, **kept)

    def describe(self, denoiser: nn.Module) -> dict:
        d = inner(denoiser)
        return {"prediction_type": d.prediction_type.value, "pipeline": type(d.frontend.pipe).__name__}

    # ---------------------------------------------------------------- conditions and shapes
    def encode_condition(self, denoiser: nn.Module, items, device=None) -> Cond:
        if isinstance(items, Cond):
            return items.to(device)
        if isinstance(items, dict):  # precomputed embeddings from shards
            known = {k: v for k, v in items.items() if k in ("embeds", "pooled", "mask")}
            return Cond(**known, extra={k: v for k, v in items.items() if k not in known}).to(device)
        if isinstance(items, Tensor):
            raise TypeError(f"family {self.name} is conditioned on prompts, not class labels")
        return inner(denoiser).frontend.encode(list(items), device)

    def null_condition(self, denoiser: nn.Module, n: int, device=None) -> Cond:
        return inner(denoiser).frontend.null(n, device)

    def class_names(self, denoiser: nn.Module) -> tuple[str, ...]:
        return ()

    def sample_shape(self, denoiser: nn.Module) -> tuple[int, ...]:
        cfg = inner(denoiser).net.config
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels),) + size

    def image_side(self, denoiser: nn.Module) -> int:
        frontend = inner(denoiser).frontend
        return frontend.sample_size * int(frontend.pipe.vae_scale_factor)

    def image_channels(self, denoiser: nn.Module) -> int:
        """The VAE's image channels (3: RGB; 1: the grayscale Fashion-MNIST teacher)."""
        return int(inner(denoiser).frontend.vae.config.in_channels)

    def encode_images(self, denoiser: nn.Module, images: Tensor) -> Tensor:
        return inner(denoiser).frontend.encode_images(images)

    def decode(self, denoiser: nn.Module, x: Tensor) -> Tensor:
        return inner(denoiser).frontend.decode(x)

    def backbone(self, denoiser: nn.Module) -> nn.Module:
        return inner(denoiser).net


def shard_encoder(denoiser: nn.Module, batch_size: int = 64, text: bool = True):
    """``encode(images, captions) -> (latents, text)`` for caption shards with precomputed fields
    (hyperscale/data/captions.py ``precompute``): VAE latents of the uint8 images (H, W[, 3]) at their
    stored size, and the text conditions by field name (embeds, pooled, mask, SDXL's time_ids) unless
    ``text`` is false."""
    import numpy as np

    d = inner(denoiser)

    @torch.no_grad()
    def encode(images, captions):
        channels = d.frontend.vae.config.in_channels
        arr = np.stack([im[..., None] if im.ndim == 2 else im for im in images])
        if arr.shape[-1] != channels:
            arr = arr.mean(-1, keepdims=True).round().astype(np.uint8) if channels == 1 else np.repeat(arr, channels, -1)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = d.frontend.encode_images(x).cpu().numpy().astype(np.float32)
        if not text:  # latents only: prompts are encoded (and cached) at training time
            return latents, None
        cond = d.frontend.encode(captions)
        return latents, {name.removeprefix("extra."): v.cpu().numpy() for name, v in cond._items()}

    return encode


class UNetFeatures:
    """Adversarial-head taps of a UNet2DConditionModel: every down block's output, then the mid block's."""

    def feature_channels(self, denoiser: nn.Module) -> list[int]:
        ch = list(inner(denoiser).net.config.block_out_channels)
        return ch + [ch[-1]]

    def features(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond) -> list[Tensor]:
        unet = inner(denoiser).net
        return feature_hooks(lambda: denoiser(x_t, t, cond), list(unet.down_blocks), unet.mid_block)
