"""The model card (README.md) written into every export: what it is, how to sample it (the
sampler the method trained it for, in diffusers' terms where the export is a pipeline folder),
the teacher, the method and the figures the run measured."""
from __future__ import annotations

from pathlib import Path


def _sampler_lines(extra: dict) -> list[str]:
    gen, few = extra.get("generator"), extra.get("sampler")
    lines = []
    if extra.get("multi_step"):
        lines.append("- one set of weights for 1 to 8 steps (Hyper-SD's unified LoRA)")
    if gen:
        lines.append(f"- 1 step: one network call at timestep {gen['timestep']} on "
                     + ("x_t = sigma_t z" if gen["noise_input"] == "sigma" else "x_t = z (pure noise)"))
    if few:
        lines.append(f"- {few['num_steps']} steps of {few['name'].upper()} ({few['spacing']} spacing), "
                     f"guidance scale {few['guidance_scale']:g}")
    return lines or ["- the teacher's own sampler (no few-step training)"]


def _shown(path: str) -> str:
    """A teacher as the card shows it: relative to the repository, else its folder's name (never the machine's layout)."""
    from hyperscale.storage.local import repo_relative

    shown = repo_relative(path)
    return Path(shown).name if Path(shown).is_absolute() else shown


def model_card(meta: dict, directory: Path) -> str:
    extra = meta.get("extra", {})
    if extra.get("method") == "denoising":  # a teacher trained from new weights: its full sampler
        extra = {"sampler": {"name": "ddim", "num_steps": 25, "spacing": "leading",
                             "guidance_scale": extra.get("guidance_scale", 7.5)}} | extra
    family = meta.get("family", "?")
    from hyperscale.models.families import FAMILIES

    family_obj = FAMILIES.get(family)
    pipeline = (directory / "model_index.json").is_file() and getattr(family_obj, "condition", "") == "text"
    steps = (1 if extra.get("generator") and not extra.get("multi_step")
             else (extra.get("sampler") or {}).get("num_steps", 4))
    guidance = (extra.get("sampler") or {}).get("guidance_scale", 1.0)
    teacher = _shown(extra["teacher"]) if extra.get("teacher") else ""
    what = (f"A {family} diffusion model trained with hyperscale from new weights (the denoising loss"
            f"{'; text encoder, VAE and schedule from ' + teacher if teacher else ''})."
            if extra.get("method") == "denoising" else
            f"A {family} student distilled with hyperscale ({extra.get('method', 'unknown method')}"
            f"{', teacher ' + teacher if teacher else ''}).")
    out = [f"# {extra.get('run', 'hyperscale student')}", "", what, "",
           "## Sampling", *_sampler_lines(extra), ""]
    if pipeline:
        from hyperscale.models.families.external import RECIPES, external_components

        external = external_components(directory)  # loaded from a package, passed to from_pretrained
        imports = [RECIPES[package][0] for package in dict.fromkeys(external.values())]
        binds = [RECIPES[package][1].format(name=name) for name, package in external.items()]
        kwargs = "".join(f", {name}={name}" for name in external)
        out += ["The folder is a diffusers pipeline whose scheduler config reproduces that sampler:", "",
                "```python", "from diffusers import DiffusionPipeline", *imports, *binds,
                f"pipe = DiffusionPipeline.from_pretrained(PATH{kwargs})",
                f"image = pipe(prompt, num_inference_steps={steps}, guidance_scale={guidance:g}"
                + (f", eta={extra['sampler'].get('eta', 0.3)}" if (extra.get('sampler') or {}).get('name') == 'tcd' else "")
                + ").images[0]", "```", ""]
    else:
        out += ["Load it with `hyperscale.models.build.load_denoiser(PATH)` (or Serve: `jobs/serve.py`)."]
        if (directory / "unet").is_dir():
            out += ["diffusers reads the network too: `UNet2DModel.from_pretrained(PATH, subfolder=\"unet\")` "
                    "(call it with `class_labels`) and `DDIMScheduler.from_pretrained(PATH, subfolder=\"scheduler\")`."]
        out += [""]
    if extra.get("lora"):
        out += ["## LoRA", f"- diffusers layout: `{extra['lora']}` (`pipe.load_lora_weights(PATH + '/lora')`)",
                "- kohya / ComfyUI keys with the true alpha: `lora/pytorch_lora_weights_kohya.safetensors`", ""]
    metrics = extra.get("metrics") or {}
    if metrics:
        out += ["## Measured", *(f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}"
                                 for k, v in sorted(metrics.items())), ""]
    if extra.get("step") is not None:
        out += [f"Trained for {extra['step']} generator updates.", ""]
    return "\n".join(out)
