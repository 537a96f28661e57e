"""Checks every text-to-image family test shares (``from t2i_checks import ...``; tests/ is on the
import path through its conftest): an export sampled by the project's own sampler against the
same export loaded with diffusers' API (``from_pretrained``, ``load_lora_weights``, ``fuse_lora``,
the kohya file through diffusers' kohya reader), and a method's losses on a tiny teacher."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from hyperscale.diffusion.sampling import one_step, sample_ddim, sample_euler, sample_tcd
from hyperscale.diffusion.schedule import RectifiedFlow
from hyperscale.models.build import load_denoiser, resolve_source
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import FewStep
from hyperscale.models.families import family_of
from hyperscale.models.families.external import load_external
from hyperscale.models.generator import export_sampler

PROMPTS = ["a photo of a dress", "a photo of a sneaker"]
TOL = 1e-5


@lru_cache(maxsize=None)
def teacher(name: str):
    """The family's tiny teacher (``tiny:<name>``), loaded once per test session."""
    torch.set_num_threads(1)
    return load_denoiser(f"tiny:{name}")


def to_unit(den, x: torch.Tensor) -> torch.Tensor:
    """What the denoiser generates -> images in [0, 1], as the pipelines' ``output_type="pt"``."""
    with torch.no_grad():
        return ((family_of(den).decode(den, x) + 1) / 2).clamp(0, 1)


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
    elif isinstance(den.schedule, RectifiedFlow):
        x = sample_euler(model, z, cond, steps or few.num_steps)
    else:
        x = sample_ddim(model, z, cond, steps or few.num_steps, spacing=few.spacing)
    return to_unit(den, x)


def _few(spec, den) -> FewStep:
    """The export's few-step sampler; a unified (multi-step) export without one samples with TCD
    (Euler on a rectified-flow schedule)."""
    flow = isinstance(den.schedule, RectifiedFlow)
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

    if not str(export).startswith(("s3://", "tiny:")):  # an export names no machine paths (the source's)
        configs = [Path(export) / "model_index.json", *Path(export).glob("*/config.json")]
        assert not [c for c in configs if "_name_or_path" in c.read_text()], configs
    den = load_denoiser(export)
    spec = export_sampler(export)
    z = latents(den, len(prompts))
    steps = _steps(spec, den)
    ours = our_images(den, spec, z, prompts, guidance=guidance)
    pipe = DiffusionPipeline.from_pretrained(str(export), **load_external(export))
    theirs = diffusers_images(pipe, z, prompts, steps, guidance, **pipe_kwargs)
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, f"{export}: diffusers' images differ from ours by {diff}"
    return diff


def check_lora_export(export: str | Path, teacher: str, prompts=PROMPTS, kohya: bool = True, **pipe_kwargs) -> dict:
    """A LoRA student's export: the teacher pipeline + ``load_lora_weights(export/lora)`` (and then
    ``fuse_lora``) and + the kohya file give the merged export's images."""
    from diffusers import DiffusionPipeline

    export = Path(export)
    if not str(export).startswith(("s3://", "tiny:")):  # an export names no machine paths (the source's)
        configs = [Path(export) / "model_index.json", *Path(export).glob("*/config.json")]
        assert not [c for c in configs if "_name_or_path" in c.read_text()], configs
    den = load_denoiser(export)
    spec = export_sampler(export)
    z = latents(den, len(prompts))
    steps = _steps(spec, den)
    merged = DiffusionPipeline.from_pretrained(str(export), **load_external(export))
    want = diffusers_images(merged, z, prompts, steps, **pipe_kwargs)
    out = {}
    files = (("diffusers", "pytorch_lora_weights.safetensors"), ("kohya", "pytorch_lora_weights_kohya.safetensors"))
    for name, weight in files:
        if not (export / "lora" / weight).is_file() or (name == "kohya" and not kohya):
            continue  # sd3: diffusers reads no kohya file, none is written
        source = resolve_source(teacher)
        pipe = DiffusionPipeline.from_pretrained(str(source), scheduler=merged.scheduler, **load_external(source))
        pipe.load_lora_weights(str(export / "lora"), weight_name=weight)
        out[name] = (diffusers_images(pipe, z, prompts, steps, **pipe_kwargs) - want).abs().max().item()
        if name == "diffusers":
            pipe.fuse_lora()
            out["fused"] = (diffusers_images(pipe, z, prompts, steps, **pipe_kwargs) - want).abs().max().item()
    bad = {k: v for k, v in out.items() if v >= TOL}
    assert not bad, f"{export}: LoRA reloads differ from the merged export: {bad}"
    return out


def method_roles(name: str, method_name: str, overrides: dict):
    """A method on the family's tiny teacher: (method, trainable roles, frozen roles, batch), the
    trainable copies perturbed as after some training (a fresh copy gives zero differences)."""
    from hyperscale.methods import build_method, method_config_class
    from hyperscale.methods.base import Batch
    from hyperscale.methods.roles import build_roles

    torch.manual_seed(0)
    method = build_method(method_config_class(method_name)(**overrides))

    def perturbed(_role, module):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return module

    def no_fresh():
        raise AssertionError("no role of these methods is built fresh")

    built = build_roles(method, teacher=lambda: teacher(name), fresh=no_fresh, rewards=lambda _s: None,
                        prepare=perturbed)
    gen = built.trainable[method.generator]
    cond = family_of(gen).encode_condition(gen, PROMPTS)
    x0 = None
    if method.batch == "data":  # TSCD trains on data latents: encoded images
        pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
        x0 = family_of(gen).encode_images(gen, pixels)
    return method, built.trainable, built.frozen, Batch(cond=cond, x0=x0)


def check_losses_train(name: str, method_name: str, overrides: dict) -> None:
    """Two steps of the method's losses: finite per-sample losses and metrics, gradients that reach
    the role each loss trains (the generator; the critic where there is one) and no frozen role."""
    method, trainable, frozen, batch = method_roles(name, method_name, overrides)
    steps = [("generator_loss", method.generator)] + ([("critic_loss", method.critic)] if method.critic else [])
    for step in range(2):
        for loss_name, role in steps:
            for m in list(trainable.values()) + list(frozen.values()):
                m.requires_grad_(m is trainable[role])
            torch.manual_seed(10 + step)
            out = getattr(method, loss_name)(batch, **trainable, **frozen)
            assert out.loss.shape == (2,) and torch.isfinite(out.loss).all(), (method_name, loss_name, out.loss)
            assert all(torch.isfinite(v).all() for v in out.metrics.values()), out.metrics
            out.loss.mean().backward()
            grads = [p.grad for p in trainable[role].parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads), (method_name, loss_name)
            assert all(p.grad is None for m in frozen.values() for p in m.parameters()), loss_name
            for m in trainable.values():
                m.zero_grad(set_to_none=True)
    for m in list(trainable.values()) + list(frozen.values()):
        m.requires_grad_(False)
