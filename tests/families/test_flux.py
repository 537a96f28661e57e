"""Family ``flux`` on its tiny random FluxPipeline (``tiny:flux``, guidance-distilled like FLUX.1-dev,
dynamic shifting): conditions, the null condition, packing inside ``call``, our 1-step and Euler
samplers against the exported pipeline, LoRA files through diffusers, and SIM / DMD / TSCD on a
rectified-flow teacher (checks: flow_family_checks.py)."""
import math

import pytest
import torch

from flow_family_checks import (ATOL, PROMPTS, check_exports_reproduce_our_samplers, check_flow_teacher,
                                check_lora_files_load_in_diffusers, check_losses_train, check_method_export,
                                noise, pipeline, teacher)
from hyperscale.models.build import tiny_pipeline_dir
from hyperscale.models.families import family_of


def _pack(z):
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(z, *z.shape)


# the pipeline takes packed latents and needs the size (its default would be 1024 px); guidance 3.5
CALL = {"pack": _pack, "height": 32, "width": 32, "guidance_scale": 3.5}
METHODS = [("sim", {"init_sigma": float("inf")}), ("dmd", {"critic_steps": 1}),
           ("tscd", {"stages": [{"segments": 4}], "num_ddim_timesteps": 10})]


def test_the_tiny_teacher_shifts_for_its_resolution():
    # 8 x 8 latents pack to 16 tokens: mu = 0.5 + (16 - 256) (1.15 - 0.5) / (4096 - 256), shift exp(mu)
    mu = 0.5 + (16 - 256) * (1.15 - 0.5) / (4096 - 256)
    check_flow_teacher("flux", math.exp(mu), "trailing")


def test_prompt_conditions_and_the_null_condition():
    den = teacher("flux")
    fam = family_of(den)
    c = fam.encode_condition(den, PROMPTS)
    assert c.embeds.shape == (2, 512, 32) and c.pooled.shape == (2, 32)  # T5 states, CLIP's pooled output
    assert fam.sample_shape(den) == (4, 8, 8)  # unpacked: 16 transformer channels = 4 x (2 x 2)
    with torch.no_grad():  # the pipeline's negative prompt "" (true CFG)
        negative, negative_pooled, _ = pipeline(tiny_pipeline_dir("flux")).encode_prompt([""], None)
    null = fam.null_condition(den, 2)
    assert torch.equal(null.embeds, negative.repeat(2, 1, 1)) and torch.equal(null.pooled, negative_pooled.repeat(2, 1))


def test_guidance_is_an_input_of_the_distilled_transformer():
    den = teacher("flux")
    cond, z, t = family_of(den).encode_condition(den, PROMPTS), noise(den), torch.tensor([0.6, 0.6])
    with torch.no_grad():
        default = den(z, t, cond)
        same = den(z, t, cond.__class__(embeds=cond.embeds, pooled=cond.pooled, extra={"guidance": torch.full((2,), 3.5)}))
        other = den(z, t, cond.__class__(embeds=cond.embeds, pooled=cond.pooled, extra={"guidance": torch.full((2,), 1.0)}))
    assert torch.equal(default, same) and (default - other).abs().max() > 1e-4


def test_one_step_and_euler_exports_reproduce_our_samples(tmp_path):
    diffs = check_exports_reproduce_our_samplers("flux", tmp_path, CALL)
    assert all(d < ATOL for d in diffs.values()), diffs


def test_lora_file_loads_and_fuses_in_diffusers(tmp_path):
    d = check_lora_files_load_in_diffusers("flux", tmp_path, CALL, ["to_q", "to_k", "to_v", "to_out.0"])
    assert d["changed"] > 1e-3 and d["loaded"] < ATOL and d["fused"] < ATOL, d


@pytest.mark.parametrize("method,overrides", METHODS, ids=[m for m, _ in METHODS])
def test_distillation_losses_are_finite_and_train(method, overrides):
    check_losses_train("flux", method, overrides)


@pytest.mark.parametrize("method,overrides", METHODS, ids=[m for m, _ in METHODS])
def test_method_exports_sample_as_the_method_does(method, overrides, tmp_path):
    assert check_method_export("flux", method, overrides, tmp_path, CALL) < ATOL
