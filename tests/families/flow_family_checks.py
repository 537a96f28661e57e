"""The checks test_sd3.py and test_flux.py share, on a family's tiny random pipeline (``tiny:<family>``):
conditions, the null condition, our samplers against the exported pipeline's own call, LoRA files
through diffusers' loaders, a method's sampler against its export (``from flow_family_checks import
...``; tests/families is on the import path). The family-agnostic pieces live in tests/t2i_checks.py."""
from __future__ import annotations

import torch

from t2i_checks import PROMPTS, diffusers_images, method_roles, teacher, to_unit as images
from hyperscale.diffusion.sampling import one_step, sample_euler
from hyperscale.diffusion.schedule import Prediction, RectifiedFlow
from hyperscale.models.build import save_denoiser, tiny_pipeline_dir
from hyperscale.models.export import FewStep, OneStepCall, SamplerSpec
from hyperscale.models.families import family_of
from hyperscale.models.lora import apply_lora, save_lora

ATOL = 1e-5  # our samples against the pipeline's, images in [0, 1]


def pipeline(source):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(source))


def noise(den, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn((n,) + family_of(den).sample_shape(den), generator=torch.Generator().manual_seed(seed))


def pipeline_images(pipe, z: torch.Tensor, steps: int, call: dict) -> torch.Tensor:
    """The pipeline's images from our noise z; ``call``: the family's fixed arguments (t2i_checks)."""
    return diffusers_images(pipe, z, PROMPTS, steps, **call)


def check_exports_reproduce_our_samplers(name: str, tmp_path, call: dict) -> dict[int, float]:
    """A 1-step call at t = 1 and n-step Euler, exported, sampled by the plain pipeline; {steps: max diff}."""
    den = teacher(name)
    fam = family_of(den)
    cond, z = fam.encode_condition(den, PROMPTS), noise(den)
    diffs = {}
    for steps in (1, 2, 4):
        with torch.no_grad():
            if steps == 1:
                ours, spec = one_step(den, z, cond, 1.0), SamplerSpec(one_step=OneStepCall(1.0))
            else:
                ours = sample_euler(den, z, cond, steps)
                spec = SamplerSpec(few_step=FewStep("euler", steps, den.schedule.spacing))
        out = save_denoiser(den, tmp_path / f"e{steps}", spec.to_extra())
        theirs = pipeline_images(pipeline(out), z, steps, call)
        diffs[steps] = (theirs - images(den, ours)).abs().max().item()
    return diffs


def lora_student(name: str, targets: list[str], seed: int = 1):
    """A copy of the tiny teacher with a rank-4, alpha-8 LoRA whose lora_B is random (it changes the output)."""
    import copy

    lora = apply_lora(copy.deepcopy(teacher(name)), rank=4, alpha=8, target_modules=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return lora.eval()


def check_lora_files_load_in_diffusers(name: str, tmp_path, call: dict, targets: list[str]) -> dict[str, float]:
    """save_lora's file through ``load_lora_weights`` and ``fuse_lora``: {what: max image diff to ours}."""
    den = teacher(name)
    save_denoiser(den, tmp_path / "base", {})
    lora = lora_student(name, targets)
    cond, z = family_of(den).encode_condition(den, PROMPTS), noise(den)
    with torch.no_grad():
        ours = images(lora, sample_euler(lora, z, cond, 2))
    save_lora(lora, tmp_path / "lora")
    pipe = pipeline(tmp_path / "base")
    out = {"changed": (pipeline_images(pipe, z, 2, call) - ours).abs().max().item()}
    pipe.load_lora_weights(str(tmp_path / "lora"))
    out["loaded"] = (pipeline_images(pipe, z, 2, call) - ours).abs().max().item()
    pipe.fuse_lora()
    out["fused"] = (pipeline_images(pipe, z, 2, call) - ours).abs().max().item()
    return out


def check_method_export(name: str, method_name: str, overrides: dict, tmp_path, call: dict) -> float:
    """The generator's own sampler (``Method.sample``) against the pipeline of its export (``Method.sampler``)."""
    method, trainable, _frozen, _batch = method_roles(name, method_name, overrides)
    gen = trainable[method.generator].eval()
    fam = family_of(gen)
    z = noise(gen)
    with torch.no_grad():
        ours = images(gen, method.sample(gen, z, fam.encode_condition(gen, PROMPTS)))
    spec = method.sampler(gen)
    out = save_denoiser(gen, tmp_path / method_name, spec.to_extra())
    steps = spec.few_step.num_steps if spec.few_step is not None else 1
    return (pipeline_images(pipeline(out), z, steps, call) - ours).abs().max().item()


def check_flow_teacher(name: str, shift: float, spacing: str) -> None:
    den = teacher(name)
    assert family_of(den).name == name and den.prediction_type is Prediction.flow
    assert isinstance(den.schedule, RectifiedFlow) and den.schedule.spacing == spacing
    assert abs(den.schedule.shift - shift) < 1e-12
    assert tiny_pipeline_dir(name).is_dir()
