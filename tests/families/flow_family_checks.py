"""The checks test_sd3.py and test_flux.py share, on a family's tiny random pipeline (``tiny:<family>``):
conditions, the null condition, our samplers against the exported pipeline's own call, LoRA files
through diffusers' loaders, and SIM / DMD / TSCD losses on the flow teacher
(``from flow_family_checks import ...``; tests/families is on the import path)."""
from __future__ import annotations

from functools import lru_cache

import torch

from hyperscale.diffusion.sampling import one_step, sample_euler
from hyperscale.diffusion.schedule import Prediction, RectifiedFlow
from hyperscale.methods import build_method, method_config_class
from hyperscale.methods.base import Batch
from hyperscale.methods.roles import build_roles
from hyperscale.models.build import load_denoiser, save_denoiser, tiny_pipeline_dir
from hyperscale.models.export import FewStep, OneStepCall, SamplerSpec
from hyperscale.models.families import family_of
from hyperscale.models.lora import apply_lora, save_lora

PROMPTS = ["a photo of a sneaker", "a sketch of a bag"]
ATOL = 1e-5  # our samples against the pipeline's, images in [0, 1]


@lru_cache(maxsize=None)
def teacher(name: str):
    """The family's tiny teacher, loaded once per test session (eval mode, frozen by the callers)."""
    torch.set_num_threads(1)
    return load_denoiser(f"tiny:{name}")


def pipeline(source):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(source))


def noise(den, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn((n,) + family_of(den).sample_shape(den), generator=torch.Generator().manual_seed(seed))


def images(den, x0: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], as the pipelines' ``output_type="pt"``."""
    with torch.no_grad():
        return ((family_of(den).decode(den, x0) + 1) / 2).clamp(0, 1)


def pipeline_images(pipe, z: torch.Tensor, steps: int, call: dict) -> torch.Tensor:
    """The pipeline's images from our noise z (B, C, H, W); ``call``: the family's fixed arguments
    (FLUX: packed latents, height and width)."""
    kw = dict(call)
    latents = kw.pop("pack")(z) if "pack" in kw else z
    return pipe(PROMPTS, num_inference_steps=steps, latents=latents, output_type="pt", **kw).images


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


def method_roles(name: str, method_name: str, overrides: dict):
    """A method on the family's tiny teacher: (method, trainable roles, frozen roles, batch), the
    trainable copies perturbed as after some training (a fresh copy gives zero differences)."""
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
    """A few steps of the method's losses: finite per-sample losses and metrics, and gradients
    that reach the role each loss trains (the generator; the critic where there is one)."""
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
            for m in trainable.values():
                m.zero_grad(set_to_none=True)
    for m in list(trainable.values()) + list(frozen.values()):
        m.requires_grad_(False)


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
