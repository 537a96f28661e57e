"""Generation without Ray: load an export, validate a request, sample, encode images.

The serving layer (``hyperscale/serve``) wraps exactly this; scripts and notebooks use it
directly::

    gen = ImageGenerator.load("runs/sim/export/ema")
    job = gen.prepare(GenerateRequest.model_validate({"class": "sneaker", "num_images": 4, "seed": 1}), Limits())
    images = gen.generate([job])[0]  # (4, C, H, W) in [-1, 1]

What a request names depends on the export's family (``Family.condition``): a class-conditional
model takes ``class`` (an index or a name) or a ``prompt`` naming a class; a text-to-image model
(sd15, sdxl) takes ``prompt``, a string or a list of strings (``num_images`` images each), an
optional ``negative_prompt`` (with guidance) and ``height`` / ``width`` among its sizes; its
latents are decoded through the family's VAE (``text_generation`` holds what this adds).

Two kinds of export are served:
- a **1-step generator** (``extra.generator`` in its metadata, e.g. SIM): one network call,
  ``steps`` must be 1, no guidance (it is distilled into the weights);
- a **multi-step denoiser** (the teacher, Hyper-SD merged weights): TCD (``eta``) or trailing
  DDIM for 1 to ``max_steps`` steps, with classifier-free guidance. The Hyper-SD unified export
  (``extra.multi_step``) also names the 1-step call its DMD phase trained (``extra.generator``):
  TCD at 1 step is that call.

Determinism: image ``i`` of a request with seed ``s`` (prompt-major for a list of prompts) is
drawn from its own ``torch.Generator`` seeded ``s + i`` (initial noise and every sampler draw), so the same
request gives the same images whatever it is batched with (bit for bit at an equal batch
shape; a different batch size changes only float rounding in the kernels, ~1e-6).
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from hyperscale.diffusion.sampling import one_step, sample_ddim, sample_euler, sample_tcd
from hyperscale.diffusion.schedule import RectifiedFlow
from hyperscale.models.build import EXPORT_META, load_denoiser, resolve_source
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import SamplerSpec
from hyperscale.models.families import family_of
from hyperscale.models.generator import OneStepGenerator, sample_shape
from hyperscale.models.text_generation import SizeRule, TextConditions, UncondCFG, prompts_of, share_frontend

MAX_SEED = 2 ** 53  # exact in JSON numbers and in float64 clients


class RequestError(ValueError):
    """A request the model cannot honour; the message names the field and the allowed values.

    ``param``: the request field it is about (given, or the ``name`` a message starting
    ``name:`` / ``name[i]:`` names; None: the request as a whole). ``sizes``: on a size the model
    does not generate, its ``SizeRule`` (an API that words sizes its own way, e.g. OpenAI's
    ``WxH``, words its message from it)."""

    def __init__(self, message: str, param: str | None = None, sizes: SizeRule | None = None):
        super().__init__(message)
        named = re.match(r"([a-z_]+)(\[\d+\])?:", message)
        self.param = param or (named.group(1) if named else None)
        self.sizes = sizes


class GenerateRequest(BaseModel):
    """The body of ``POST /v1/generate``. Class models: ``class`` (index or name) or a ``prompt``
    naming one; text-to-image models: ``prompt`` (GET /v1/models says which a model takes)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: Optional[Union[int, str]] = Field(None, alias="class", description="class index or name")
    prompt: Optional[Union[str, list[str]]] = Field(
        None, description="text-to-image models: the prompt, or a list of prompts (num_images images each); "
                          "class models: free text naming a class, e.g. 'a photo of a sneaker'")
    negative_prompt: Optional[str] = Field(None, description="text-to-image models with guidance_scale > 1: "
                                                             "the unconditional side of guidance")
    num_images: int = Field(1, ge=1)
    seed: Optional[int] = Field(None, ge=0, lt=MAX_SEED, description="omitted: a random seed, returned")
    steps: Optional[int] = Field(None, ge=1, description="omitted: the model's default")
    sampler: Optional[Literal["tcd", "ddim", "euler"]] = Field(
        None, description="multi-step models only: tcd or ddim (VP models), euler or tcd (rectified flow)")
    eta: Optional[float] = Field(None, ge=0, le=1, description="TCD gamma; multi-step models only")
    guidance_scale: Optional[float] = Field(None, ge=1, le=20, description="CFG; multi-step models only")
    height: Optional[int] = Field(None, ge=1, description="pixels, one of the model's heights (GET /v1/models)")
    width: Optional[int] = Field(None, ge=1, description="pixels, one of the model's widths (GET /v1/models)")
    size: Optional[int] = Field(None, ge=1, description="output width in pixels (nearest upscale)")
    adapter: Optional[str] = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                                   description="a named model under the server's adapters directory")
    format: Literal["png", "jpeg"] = "png"
    response: Literal["json", "image"] = Field("json", description="image: raw bytes (num_images = 1)")


@dataclass
class Limits:
    """Server-side bounds on one request (docs/benchmarks.md §9: every excess is a 4xx naming the field)."""

    max_images_per_request: int = 16
    max_steps: int = 8
    max_prompt_chars: int = 256
    max_size: int = 512


def check_limits(req: GenerateRequest, limits: Limits) -> None:
    prompts = prompts_of(req)
    images = req.num_images * max(1, len(prompts))
    if images > limits.max_images_per_request:
        count = f"{len(prompts)} prompts x {req.num_images} = {images} images" if len(prompts) > 1 else images
        raise RequestError(f"num_images: {count} is over this server's limit of "
                           f"{limits.max_images_per_request} per request")
    if req.steps is not None and req.steps > limits.max_steps:
        raise RequestError(f"steps: {req.steps} is over this server's limit of {limits.max_steps}")
    texts = [("prompt" if isinstance(req.prompt, str) else f"prompt[{i}]", p) for i, p in enumerate(prompts)]
    for name, text in texts + ([("negative_prompt", req.negative_prompt)] if req.negative_prompt else []):
        if len(text) > limits.max_prompt_chars:
            raise RequestError(f"{name}: {len(text)} characters is over the limit of {limits.max_prompt_chars}")
    if req.size is not None and req.size > limits.max_size:
        raise RequestError(f"size: {req.size} is over this server's limit of {limits.max_size} pixels")
    if req.response == "image" and images != 1:
        raise RequestError("response: 'image' returns one image; ask num_images = 1 (and one prompt) "
                           "or response = 'json'")


def resolve_class(req: GenerateRequest, names: tuple[str, ...]) -> int:
    """The label a request asks for: ``class`` as an index or a name, or the class a prompt names."""
    known = ", ".join(names)
    label = None
    if isinstance(req.class_, int) and not isinstance(req.class_, bool):
        if not 0 <= req.class_ < len(names):
            raise RequestError(f"class: {req.class_} is out of range 0..{len(names) - 1}")
        label = req.class_
    elif isinstance(req.class_, str):
        key = req.class_.strip().lower()
        matches = [i for i, n in enumerate(names) if key == n.lower() or key in n.lower().split("/")]
        if not matches:
            raise RequestError(f"class: '{req.class_}' is not a known class; known: {known}")
        label = matches[0]
    if req.prompt is not None:
        text = req.prompt.lower()
        found = sorted(((len(part), i) for i, n in enumerate(names) for part in [n.lower(), *n.lower().split("/")]
                        if part and part in text), reverse=True)
        if label is None:
            if not found:
                raise RequestError(f"prompt: names no known class; known: {known}")
            label = found[0][1]
        elif found and found[0][1] != label:
            raise RequestError(f"prompt names '{names[found[0][1]]}' but class asks for '{names[label]}'")
    if label is None:
        raise RequestError("give 'class' (an index or a name) or a 'prompt' that names a class")
    return label


@dataclass
class Job:
    """One validated request on its way through a (possibly shared) batch."""

    req: GenerateRequest
    label: int = -1  # class models
    seed: int = -1
    settings: tuple = field(default=())  # (sample shape, sampling...): equal settings share a network batch
    prompts: tuple[str, ...] = ()  # text-to-image models: one per image

    @property
    def count(self) -> int:
        """Images this job draws."""
        return len(self.prompts) or self.req.num_images


def encode_image(x: Tensor, fmt: str = "png", size: int | None = None) -> bytes:
    """One image (C, H, W) in [-1, 1] -> PNG or JPEG bytes, optionally upscaled (nearest) to width ``size``."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    img = Image.fromarray(arr)
    if size is not None and size != img.width:
        img = img.resize((size, round(size * img.height / img.width)), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", **({"quality": 95} if fmt == "jpeg" else {}))
    return buf.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


DECODE_BATCH = 8  # latents decoded per VAE call (bounds its activation memory at large sizes)


class ImageGenerator:
    """A loaded export that turns validated requests into images."""

    def __init__(self, model: torch.nn.Module, one_step: bool, class_names: tuple[str, ...],
                 default_steps: int = 4, default_eta: float = 0.3, name: str = "default",
                 sampler: SamplerSpec | None = None):
        self.model, self.one_step, self.class_names = model.eval(), one_step, class_names
        self.sampler = sampler or SamplerSpec()  # a multi-step model's own 1-step call, if any
        self.default_steps, self.default_eta, self.name = default_steps, default_eta, name
        self.denoiser = model.denoiser if one_step else model
        self.shape = sample_shape(self.denoiser)
        self.family = family_of(self.denoiser)
        self.flow = isinstance(self.denoiser.schedule, RectifiedFlow)  # SD3 / FLUX: Euler on the flow path
        self.text = TextConditions(self.denoiser, self.family, self.shape) if self.family.condition == "text" else None
        self.sizes = self.text.sizes if self.text is not None else SizeRule.native(self.shape)

    @classmethod
    def load(cls, source: str | os.PathLike, name: str = "default",
             lora_base: str | os.PathLike | None = None) -> "ImageGenerator":
        """An export directory (``s3://`` and hub ids too). A directory holding only a diffusers-format
        LoRA (``pytorch_lora_weights.safetensors``, e.g. a Hyper-SD adapter, or the ``lora/`` of a
        LoRA student's export) is applied to ``lora_base`` and merged, so it samples as fast as
        plain weights; text-to-image adapters share the base's text encoders and VAE."""
        from hyperscale.models.lora import is_bare_adapter, merged_adapter

        path = Path(resolve_source(str(source)))
        if is_bare_adapter(path):
            if lora_base is None:
                raise FileNotFoundError(f"{source}: a LoRA adapter, but no base model to apply it to "
                                        f"(set the server's lora_base)")
            base = _load_denoiser(resolve_source(str(lora_base)))
            names = family_of(base).class_names(base)
            return cls(merged_adapter(base, path), False, names, name=name)
        meta = json.loads((path / EXPORT_META).read_text())
        extra = meta.get("extra", {})
        spec = SamplerSpec.from_extra(extra)
        denoiser = _load_denoiser(path)
        if spec.is_one_step_generator:
            model, one_step = OneStepGenerator(denoiser, spec.one_step.timestep, spec.one_step.noise_input), True
        else:
            model, one_step = denoiser, False
        names = tuple(extra.get("class_names") or family_of(denoiser).class_names(denoiser))
        return cls(model, one_step, names, name=name, sampler=spec)

    def describe(self) -> dict:
        """The model-info record (GET /v1/models): family, what it takes, sizes, steps, samplers."""
        image = [self.text.image_channels, *self.sizes.default] if self.text is not None else list(self.shape)
        d = {"name": self.name, "family": self.family.name, "takes": "prompts" if self.text is not None else "classes",
             "kind": "one-step" if self.one_step else "multi-step", "image_shape": image,
             "classes": list(self.class_names), "sizes": self.sizes.describe(),
             "default_steps": 1 if self.one_step else self.default_steps}
        if not self.one_step:
            d |= {"samplers": ["euler", "tcd"] if self.flow else ["tcd", "ddim"], "default_eta": self.default_eta, "default_guidance_scale": 1.0,
                  "negative_prompt": self.text is not None}
        if self.sampler.multi_step and self.sampler.one_step is not None:
            d["one_step_call"] = self.sampler.one_step.to_json()
        return d

    def prepare(self, req: GenerateRequest, limits: Limits) -> Job:
        """Validate a request against the limits and this model; raises ``RequestError``."""
        check_limits(req, limits)
        label, prompts = -1, []
        if self.text is None:
            if isinstance(req.prompt, list):
                raise RequestError(f"prompt: a list of prompts is for text-to-image models; '{self.name}' takes "
                                   f"one class ('class', or a prompt naming one)")
            if req.negative_prompt is not None:
                raise RequestError(f"negative_prompt: applies to text-to-image models; '{self.name}' takes classes")
            label = resolve_class(req, self.class_names)
        if self.one_step:
            for name in ("sampler", "eta", "guidance_scale", "negative_prompt"):
                if getattr(req, name) is not None:
                    raise RequestError(f"{name}: '{self.name}' is a 1-step generator; {name} applies to "
                                       f"multi-step models only")
            if req.steps not in (None, 1):
                raise RequestError(f"steps: '{self.name}' is a 1-step generator; steps must be 1")
            sampling = (1,)
        else:
            sampler = req.sampler or ("euler" if self.flow else "tcd")
            if sampler not in (("euler", "tcd") if self.flow else ("tcd", "ddim")):
                raise RequestError(f"sampler: '{self.name}' samples with " + ("euler or tcd (a rectified-flow model)"
                                   if self.flow else "tcd or ddim; euler is for rectified-flow models"))
            if sampler != "tcd" and req.eta is not None:
                raise RequestError(f"eta: applies to the tcd sampler; {sampler} here is deterministic (eta 0)")
            eta = self.default_eta if req.eta is None else req.eta
            sampling = (req.steps or self.default_steps, sampler, eta if sampler == "tcd" else 0.0,
                        req.guidance_scale or 1.0)
        if self.text is not None:
            prompts, shape = self.text.prepare(req, self.name, guided=self._guided(sampling))
        else:
            shape = self.sizes.sample_shape(req, self.name)
        seed = req.seed if req.seed is not None else random.randrange(MAX_SEED - limits.max_images_per_request)
        return Job(req, label, seed, (shape, *sampling), tuple(prompts))

    def _guided(self, sampling: tuple) -> bool:
        return not self.one_step and sampling[-1] != 1.0

    @torch.no_grad()
    def generate(self, jobs: list[Job]) -> list[Tensor]:
        """Images per job, (count, C, H, W) in [-1, 1]; jobs with equal settings share one batch."""
        out: list[Tensor | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.settings, []).append(i)
        for (shape, *sampling), idx in groups.items():
            batch = [jobs[i] for i in idx]
            gens = [torch.Generator().manual_seed(job.seed + k) for job in batch for k in range(job.count)]
            z = torch.stack([torch.randn(shape, generator=g) for g in gens])
            x = self._decode(self._sample(tuple(sampling), z, *self._conditions(batch, tuple(sampling)), gens))
            start = 0
            for i, job in zip(idx, batch):
                out[i], start = x[start:start + job.count], start + job.count
        return out

    def _conditions(self, batch: list[Job], sampling: tuple):
        """(condition, unconditional rows or None) of a batch, one row per image."""
        if self.text is None:
            return torch.tensor([job.label for job in batch for _ in range(job.count)]), None
        cond = self.text.encode([p for job in batch for p in job.prompts])
        if not self._guided(sampling):
            return cond, None
        return cond, self.text.uncond([job.req.negative_prompt for job in batch for _ in range(job.count)])

    def _sample(self, sampling: tuple, z: Tensor, cond, uncond, gens: list[torch.Generator]) -> Tensor:
        if self.one_step:
            return self.model(z, cond)
        steps, sampler, eta, w = sampling
        if w == 1.0:
            den = self.model
        else:
            den = CFGDenoiser(self.model, w) if uncond is None else UncondCFG(self.model, w, uncond)
        call = self.sampler.one_step_at(steps, sampler)
        if call is not None:
            return one_step(den, z, cond, call.timestep, call.noise_input)
        if sampler == "euler":
            return sample_euler(den, z, cond, steps)
        if sampler == "ddim":
            return sample_ddim(den, z, cond, steps, spacing="trailing", clip_x0=self.family.bounded)
        return sample_tcd(den, z, cond, steps, eta=eta, generator=gens)

    def _decode(self, x: Tensor) -> Tensor:
        """Samples -> images in [-1, 1]: the family's decode (the identity for pixel families)."""
        parts = [self.family.decode(self.denoiser, x[i:i + DECODE_BATCH]) for i in range(0, len(x), DECODE_BATCH)]
        return torch.cat(parts).clamp(-1, 1)

    def result_fields(self, job: Job) -> dict:
        """What a response says was drawn: the class, or the prompt per image and the size."""
        if self.text is None:
            return {"class": job.label, "class_name": self.class_names[job.label]}
        shape = job.settings[0]
        return {"prompts": list(job.prompts), "height": shape[-2] * self.sizes.factor,
                "width": shape[-1] * self.sizes.factor}

    def render(self, job: Job, images: Tensor) -> list[bytes]:
        return [encode_image(x, job.req.format, job.req.size) for x in images]


def _load_denoiser(path: Path) -> torch.nn.Module:
    """``load_denoiser``, with one frontend per pipeline folder for text-to-image families."""
    denoiser = load_denoiser(path)
    if family_of(denoiser).condition == "text":
        share_frontend(denoiser, path)
    return denoiser
