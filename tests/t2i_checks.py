"""Checks every text-to-image family test shares (``from t2i_checks import ...``; tests/ is on the
import path through its conftest): an export sampled by the project's own sampler against the
same export loaded with diffusers' API (``from_pretrained``, ``load_lora_weights``, ``fuse_lora``,
the kohya file through diffusers' kohya reader)."""
from __future__ import annotations

from pathlib import Path

import torch

from hyperscale.diffusion.sampling import one_step, sample_ddim, sample_euler, sample_tcd
from hyperscale.models.build import load_denoiser, resolve_source
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import FewStep
from hyperscale.models.families import family_of
from hyperscale.models.generator import export_sampler

PROMPTS = ["a photo of a dress", "a photo of a sneaker"]
TOL = 1e-5


def latents(den, n: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *family_of(den).sample_shape(den)), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def our_images(den, spec, z, prompts=PROMPTS, steps: int | None = None, guidance: float = 1.0,
               eta: float = 0.3) -> torch.Tensor:
    """Images in [0, 1] from the project's sampler for an export's SamplerSpec."""
    fam = family_of(den)
    few = _few(spec, den)
    cond = fam.encode_condition(den, prompts)
    model = CFGDenoiser(den, guidance) if guidance != 1.0 else den
    if spec.is_one_step_generator:
        x = one_step(model, z, cond, spec.one_step.timestep, spec.one_step.noise_input)
    elif few.name == "tcd":
        x = sample_tcd(model, z, cond, steps or few.num_steps, eta=eta, generator=torch.Generator().manual_seed(1))
    elif den.schedule.__class__.__name__ == "RectifiedFlow":
        x = sample_euler(model, z, cond, steps or few.num_steps)
    else:
        x = sample_ddim(model, z, cond, steps or few.num_steps, spacing=few.spacing)
    return ((fam.decode(den, x) + 1) / 2).clamp(0, 1)


def _few(spec, den) -> FewStep:
    """The export's few-step sampler; a unified (multi-step) export without one samples with TCD
    (Euler on a rectified-flow schedule)."""
    flow = den.schedule.__class__.__name__ == "RectifiedFlow"
    return spec.few_step or (FewStep("euler", 4, den.schedule.spacing) if flow else FewStep("tcd", 4))


def _steps(spec, den) -> int:
    return 1 if spec.is_one_step_generator else _few(spec, den).num_steps


@torch.no_grad()
def diffusers_images(pipe, z, prompts=PROMPTS, steps: int = 1, guidance: float = 1.0, eta: float = 0.3,
                     **kwargs) -> torch.Tensor:
    """``kwargs``: the family's fixed pipeline arguments; ``pack`` turns our latents (B, C, H, W) into
    the pipeline's (FLUX), ``guidance_scale`` there overrides ``guidance`` (FLUX's embedded guidance)."""
    pipe.set_progress_bar_config(disable=True)
    call = {"guidance_scale": guidance} | kwargs
    latents = call.pop("pack")(z.clone()) if "pack" in call else z.clone()
    if type(pipe.scheduler).__name__ == "TCDScheduler":
        call |= {"eta": eta, "generator": torch.Generator().manual_seed(1)}
    return pipe(prompts, num_inference_steps=steps, latents=latents, output_type="pt", **call).images


def check_export(export: str | Path, prompts=PROMPTS, guidance: float = 1.0, **pipe_kwargs) -> float:
    """The export's images from diffusers' ``from_pretrained`` equal the project's sampler's; returns the max diff."""
    from diffusers import DiffusionPipeline

    den = load_denoiser(export)
    spec = export_sampler(export)
    z = latents(den, len(prompts))
    steps = _steps(spec, den)
    ours = our_images(den, spec, z, prompts, guidance=guidance)
    theirs = diffusers_images(DiffusionPipeline.from_pretrained(str(export)), z, prompts, steps, guidance, **pipe_kwargs)
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, f"{export}: diffusers' images differ from ours by {diff}"
    return diff


def check_lora_export(export: str | Path, teacher: str, prompts=PROMPTS, kohya: bool = True, **pipe_kwargs) -> dict:
    """A LoRA student's export: the teacher pipeline + ``load_lora_weights(export/lora)`` (and then
    ``fuse_lora``) and + the kohya file give the merged export's images."""
    from diffusers import DiffusionPipeline

    export = Path(export)
    den = load_denoiser(export)
    spec = export_sampler(export)
    z = latents(den, len(prompts))
    steps = _steps(spec, den)
    merged = DiffusionPipeline.from_pretrained(str(export))
    want = diffusers_images(merged, z, prompts, steps, **pipe_kwargs)
    out = {}
    files = (("diffusers", "pytorch_lora_weights.safetensors"), ("kohya", "pytorch_lora_weights_kohya.safetensors"))
    for name, weight in files:
        if not (export / "lora" / weight).is_file() or (name == "kohya" and not kohya):
            continue  # sd3: diffusers reads no kohya file, none is written
        pipe = DiffusionPipeline.from_pretrained(str(resolve_source(teacher)), scheduler=merged.scheduler)
        pipe.load_lora_weights(str(export / "lora"), weight_name=weight)
        out[name] = (diffusers_images(pipe, z, prompts, steps, **pipe_kwargs) - want).abs().max().item()
        if name == "diffusers":
            pipe.fuse_lora()
            out["fused"] = (diffusers_images(pipe, z, prompts, steps, **pipe_kwargs) - want).abs().max().item()
    bad = {k: v for k, v in out.items() if v >= TOL}
    assert not bad, f"{export}: LoRA reloads differ from the merged export: {bad}"
    return out
