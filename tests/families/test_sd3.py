"""Family ``sd3`` on its tiny random StableDiffusion3Pipeline (``tiny:sd3``): conditions, the
null condition, our 1-step and Euler samplers against the exported pipeline, LoRA files through
diffusers, and SIM / DMD / TSCD on a rectified-flow teacher (checks: flow_family_checks.py)."""
import pytest
import torch

from t2i_checks import check_losses_train
from flow_family_checks import (ATOL, PROMPTS, check_exports_reproduce_our_samplers, check_flow_teacher,
                                check_lora_files_load_in_diffusers, check_method_export,
                                pipeline, teacher)
from hyperscale.models.build import save_denoiser, tiny_pipeline_dir
from hyperscale.models.export import OneStepCall, SamplerSpec
from hyperscale.models.families import family_of

CALL = {"guidance_scale": 1.0}  # no CFG in the pipeline: our samplers are unguided
METHODS = [("sim", {"init_sigma": float("inf")}), ("dmd", {"critic_steps": 1}),
           ("dmd", {"regression": "online", "regression_steps": 2}),
           ("tscd", {"stages": [{"segments": 4}], "num_ddim_timesteps": 10}),
           ("tscd", {"stages": [{"segments": 2}], "target": "random", "target_network": "online"})]


def test_the_tiny_teacher_is_a_static_shift_flow_model():
    check_flow_teacher("sd3", 3.0, "linspace")  # the scheduler config's shift; the scheduler's own grid


def test_prompt_conditions_and_the_null_condition():
    den = teacher("sd3")
    fam = family_of(den)
    c = fam.encode_condition(den, PROMPTS)
    # joint sequence: both CLIPs' 16 tokens (32 + 32 wide, zero-padded to T5's 64), then T5's 256
    assert c.embeds.shape == (2, 16 + 256, 64) and c.pooled.shape == (2, 64)
    assert fam.sample_shape(den) == (4, 8, 8)
    with torch.no_grad():
        _, negative, _, negative_pooled = pipeline(tiny_pipeline_dir("sd3")).encode_prompt(
            PROMPTS[:1], None, None, do_classifier_free_guidance=True)
    null = fam.null_condition(den, 3)
    assert torch.equal(null.embeds, negative.repeat(3, 1, 1)) and torch.equal(null.pooled, negative_pooled.repeat(3, 1))


def test_one_step_and_euler_exports_reproduce_our_samples(tmp_path):
    diffs = check_exports_reproduce_our_samplers("sd3", tmp_path, CALL)
    assert all(d < ATOL for d in diffs.values()), diffs


def test_a_one_step_export_below_t_1_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="init_sigma=.inf"):
        save_denoiser(teacher("sd3"), tmp_path / "e", SamplerSpec(one_step=OneStepCall(0.7)).to_extra())


def test_lora_file_loads_and_fuses_in_diffusers(tmp_path):
    d = check_lora_files_load_in_diffusers("sd3", tmp_path, CALL, ["to_q", "to_k", "to_v", "to_out.0"])
    assert d["changed"] > 1e-3 and d["loaded"] < ATOL and d["fused"] < ATOL, d


@pytest.mark.parametrize("method,overrides", METHODS, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_distillation_losses_are_finite_and_train(method, overrides):
    check_losses_train("sd3", method, overrides)


@pytest.mark.parametrize("method,overrides", [METHODS[0], METHODS[1], METHODS[3]], ids=["sim", "dmd", "tscd"])
def test_method_exports_sample_as_the_method_does(method, overrides, tmp_path):
    assert check_method_export("sd3", method, overrides, tmp_path, CALL) < ATOL


def test_no_kohya_file_for_sd3(tmp_path):
    """diffusers reads no kohya file for SD3 (a lora_unet_ file loads as nothing), so none is written."""
    from flow_family_checks import lora_student
    from hyperscale.models.lora import KOHYA_WEIGHTS, LORA_WEIGHTS, save_lora

    save_lora(lora_student("sd3", ["to_q"]), tmp_path, kohya=True)
    assert (tmp_path / LORA_WEIGHTS).is_file() and not (tmp_path / KOHYA_WEIGHTS).exists()
