"""Family ``flux`` on its tiny random FluxPipeline (``tiny:flux``, guidance-distilled like FLUX.1-dev,
dynamic shifting): conditions, the null condition, packing inside ``call``, our 1-step and Euler
samplers against the exported pipeline, LoRA files through diffusers, and SIM / DMD / TSCD on a
rectified-flow teacher (checks: flow_family_checks.py)."""
import math

import pytest
import torch

from t2i_checks import check_losses_train
from flow_family_checks import (ATOL, PROMPTS, check_exports_reproduce_our_samplers, check_flow_teacher, images,
                                check_lora_files_load_in_diffusers, check_method_export,
                                lora_student, noise, pipeline, pipeline_images, teacher)
from hyperscale.models.build import tiny_pipeline_dir
from hyperscale.models.cond import Cond
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
    at = lambda g: Cond(embeds=cond.embeds, pooled=cond.pooled, extra={"guidance": torch.full((2,), g)})  # noqa: E731
    with torch.no_grad():
        default, same, other = den(z, t, cond), den(z, t, at(3.5)), den(z, t, at(1.0))
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


# LoRA targets for the kohya checks. diffusers' FLUX kohya reader splits single blocks' fused linear1
# at FLUX.1's sizes (3 x 3072 + 12288) only, so single blocks' q/k/v stay out of the tiny model's
# files, and it keys the layers outside the blocks (img_in, txt_in, final_layer) without the
# "transformer." prefix, so load_lora_weights drops them: the images are checked on block layers,
# the conversion on every layer.
BLOCK_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "to_out.0", "add_k_proj",
                 "to_add_out", "ff.net.0.proj", "ff_context.net.2", "norm1.linear",
                 "single_transformer_blocks.0.proj_out"]
OUTER_TARGETS = ["x_embedder", "context_embedder", "proj_out", "norm_out.linear"]


def _kohya_file(tmp_path, targets):
    from safetensors.torch import load_file

    from hyperscale.models.lora import KOHYA_WEIGHTS, save_lora

    lora = lora_student("flux", targets)
    save_lora(lora, tmp_path / "lora", kohya=True)
    return lora, load_file(str(tmp_path / "lora" / KOHYA_WEIGHTS))


def test_kohya_file_in_bfl_names_loads_in_diffusers(tmp_path):
    """save_lora's kohya file (BFL names; fused q/k/v with zero blocks for the members without LoRA)
    read back by ``load_lora_weights``: the same images."""
    from hyperscale.diffusion.sampling import sample_euler
    from hyperscale.models.build import save_denoiser
    from hyperscale.models.lora import KOHYA_WEIGHTS

    den = teacher("flux")
    save_denoiser(den, tmp_path / "base", {})
    lora, keys = _kohya_file(tmp_path, BLOCK_TARGETS)
    assert all(k.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for k in keys)
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * 8  # 3 members, alpha 8 each
    cond, z = family_of(den).encode_condition(den, PROMPTS), noise(den)
    with torch.no_grad():
        ours = images(lora, sample_euler(lora, z, cond, 2))
    pipe = pipeline(tmp_path / "base")
    assert (pipeline_images(pipe, z, 2, CALL) - ours).abs().max() > 1e-3
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=KOHYA_WEIGHTS)
    assert (pipeline_images(pipe, z, 2, CALL) - ours).abs().max() < ATOL


def test_kohya_conversion_in_diffusers_gives_every_layer_its_update(tmp_path):
    """diffusers' conversion of the file (``FluxPipeline.lora_state_dict``) gives each layer the
    LoRA update (alpha / r) B A it has here, the final layer's (scale folded in, adaLN rows in BFL order) included."""
    from diffusers import FluxPipeline

    lora, keys = _kohya_file(tmp_path, BLOCK_TARGETS + OUTER_TARGETS)
    assert "lora_unet_img_in.alpha" in keys and "lora_unet_final_layer_adaLN_modulation_1.alpha" in keys
    state = lora.lora_state_dict()
    converted = FluxPipeline.lora_state_dict(dict(keys))
    theirs = {k.removeprefix("transformer.")[: -len(".lora_A.weight")]: converted[k.replace("lora_A", "lora_B")] @ v
              for k, v in converted.items() if k.endswith(".lora_A.weight")}
    for k, a in state.items():
        if k.endswith(".lora_A.weight"):
            module = k[: -len(".lora_A.weight")]
            torch.testing.assert_close(theirs[module], 8.0 / 4 * state[module + ".lora_B.weight"] @ a,
                                       rtol=1e-6, atol=1e-7)


def test_kohya_fused_single_block_layer_gives_the_same_update():
    """linear1 = [q; k; v; mlp]: the fused LoRA's update (alpha' / rank') up @ down equals the members'
    (alpha / r) B A stacked, with zeros for proj_mlp, which has no LoRA."""
    from hyperscale.models.families.flux_kohya import bfl_state_dict

    lora = lora_student("flux", ["to_q", "to_k", "to_v"])
    state, net = lora.lora_state_dict(), family_of(lora).backbone(lora)
    keys = bfl_state_dict(net, state, 8.0)
    name = "lora_unet_single_blocks_0_linear1"
    down, up = keys[name + ".lora_down.weight"], keys[name + ".lora_up.weight"]
    fused = keys[name + ".alpha"] / down.shape[0] * (up @ down)
    block = "single_transformer_blocks.0."
    parts = [8.0 / 4 * state[f"{block}attn.{m}.lora_B.weight"] @ state[f"{block}attn.{m}.lora_A.weight"]
             for m in ("to_q", "to_k", "to_v")]
    mlp = net.get_submodule(block + "proj_mlp")
    torch.testing.assert_close(fused, torch.cat(parts + [torch.zeros(mlp.out_features, mlp.in_features)]),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no BFL kohya name"):
        bfl_state_dict(net, {"pos_embed.lora_A.weight": torch.zeros(1, 1),
                             "pos_embed.lora_B.weight": torch.zeros(1, 1)}, 1.0)
