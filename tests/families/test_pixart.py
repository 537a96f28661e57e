"""The ``pixart`` family on the tiny PixArt-alpha pipeline (``tiny:pixart``): T5 conditions with
their mask, the null condition, learned sigma, pipeline-folder exports that reproduce our samplers
through ``DiffusionPipeline.from_pretrained`` (1-step SIM and DMD calls, DDIM and TCD, CFG), the
LoRA student's merged export and its peft file, PixArt-Sigma folders, the 1024-px micro-conditions,
the adversarial taps and the SIM / DMD losses on the tiny teacher."""
import copy

import pytest
import torch

from t2i_checks import check_losses_train
from hyperscale.diffusion.sampling import NoiseInput, one_step, sample_ddim, sample_tcd
from hyperscale.diffusion.schedule import Prediction
from hyperscale.models.build import load_denoiser, save_denoiser
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.export import FewStep, OneStepCall, SamplerSpec
from hyperscale.models.families import FAMILIES, family_of
from hyperscale.models.lora import LORA_WEIGHTS, apply_lora, load_lora, save_student

PROMPTS = ["a photo of a sneaker", "a red bag on a plain background"]
# what a tiny export is called with (module docstring of families/pixart.py)
PIPE_KW = dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=16, output_type="pt")
TOL = 1e-5
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture(scope="module")
def den():
    torch.manual_seed(0)
    return load_denoiser("tiny:pixart")


def _noise(den, n=len(PROMPTS), seed=0):
    return torch.randn((n,) + family_of(den).sample_shape(den), generator=torch.Generator().manual_seed(seed))


def _images(den, x0):
    """Our latents -> images as the pipeline returns them (output_type="pt")."""
    return ((family_of(den).decode(den, x0) + 1) / 2).clamp(0, 1)


def _pipeline_images(folder, z, steps, **kw):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, num_inference_steps=steps, latents=z, **(PIPE_KW | {"guidance_scale": 1.0} | kw)).images


def _sim_t(den):
    return den.schedule.timestep_for_sigma_ve(2.5)


# name -> (spec, steps, our sample, extra pipeline kwargs); TCD draws its noise from a seeded generator
CASES = {
    "sim_1step": lambda den, z, c: (SamplerSpec(one_step=OneStepCall(_sim_t(den), NoiseInput.sigma)), 1,
                                    one_step(den, z, c, _sim_t(den), "sigma"), {}),
    "dmd_1step": lambda den, z, c: (SamplerSpec(one_step=OneStepCall(399, NoiseInput.unit)), 1,
                                    one_step(den, z, c, 399, "unit"), {}),
    "ddim_trailing_4": lambda den, z, c: (SamplerSpec(few_step=FewStep("ddim", 4, "trailing")), 4,
                                          sample_ddim(den, z, c, 4, spacing="trailing"), {}),
    "tcd_4_eta_0.3": lambda den, z, c: (SamplerSpec(few_step=FewStep("tcd", 4)), 4,
                                        sample_tcd(den, z, c, 4, eta=0.3, generator=torch.Generator().manual_seed(7)),
                                        {"eta": 0.3, "generator": torch.Generator().manual_seed(7)}),
}


def test_the_tiny_pipeline_is_a_pixart_denoiser(den):
    from diffusers import DDPMScheduler

    fam = family_of(den)
    assert fam is FAMILIES["pixart"] and not fam.bounded and fam.condition == "text"
    assert type(den.frontend.pipe).__name__ == "PixArtAlphaPipeline"
    assert type(fam.backbone(den)).__name__ == "PixArtTransformer2DModel" and fam.lora_prefix == "transformer"
    assert fam.sample_shape(den) == (4, 8, 8) and den.net.config.out_channels == 8  # learned sigma
    assert den.prediction_type is Prediction.eps
    # the VP schedule of the DPM-Solver config's betas
    ddpm = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    assert torch.allclose(den.schedule.alphas_cumprod, ddpm.alphas_cumprod.double())


def test_conditions_carry_t5_states_and_mask_and_the_null_is_the_pipelines_empty_negative(den):
    fam = family_of(den)
    cond = fam.encode_condition(den, PROMPTS)
    assert cond.embeds.shape == (2, 16, 32) and cond.mask.shape == (2, 16) and not cond.extra
    assert cond.mask.dtype == torch.long and cond.mask[:, 0].eq(1).all() and (cond.mask.sum(1) < 16).all()
    pipe = den.frontend.pipe
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, True, negative_prompt="", clean_caption=False,
                                                     max_sequence_length=16)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.mask, mask)
    null = fam.null_condition(den, 2)
    assert torch.equal(null.embeds, neg) and torch.equal(null.mask, neg_mask)
    assert null.mask.sum(1).tolist() == [1, 1]  # "" is the end-of-sequence token alone
    # precomputed embeddings from shards give the same Cond
    again = fam.encode_condition(den, {"embeds": cond.embeds, "mask": cond.mask})
    assert torch.equal(again.embeds, cond.embeds) and torch.equal(again.mask, cond.mask)


def test_learned_sigma_keeps_the_eps_half(den):
    cond = family_of(den).encode_condition(den, PROMPTS)
    x, t = _noise(den), torch.tensor([10, 700])
    with torch.no_grad():
        full = den.net(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        eps = den(x, t, cond)
    assert full.shape == (2, 8, 8, 8) and torch.equal(eps, full[:, :4])


@pytest.mark.parametrize("case", list(CASES))
def test_the_exported_pipeline_folder_reproduces_our_sampler(den, case, tmp_path):
    fam = family_of(den)
    z, cond = _noise(den), fam.encode_condition(den, PROMPTS)
    with torch.no_grad():
        spec, steps, x0, kw = CASES[case](den, z, cond)
        ours = _images(den, x0)
    save_denoiser(den, tmp_path / "export", spec.to_extra())
    theirs = _pipeline_images(tmp_path / "export", z, steps, **kw)
    assert theirs.shape == ours.shape == (2, 3, 32, 32)
    assert (theirs - ours).abs().max() <= TOL


def test_guided_ddim_equals_the_pipelines_guidance_with_its_empty_negative_prompt(den, tmp_path):
    fam = family_of(den)
    z, cond = _noise(den), fam.encode_condition(den, PROMPTS)
    with torch.no_grad():
        ours = _images(den, sample_ddim(CFGDenoiser(den, 3.0), z, cond, 4, spacing="trailing"))
        unguided = _images(den, sample_ddim(den, z, cond, 4, spacing="trailing"))
    save_denoiser(den, tmp_path / "export", SamplerSpec(few_step=FewStep("ddim", 4, "trailing", 3.0)).to_extra())
    theirs = _pipeline_images(tmp_path / "export", z, 4, guidance_scale=3.0)
    assert (theirs - ours).abs().max() <= TOL
    assert (ours - unguided).abs().max() > 1e-3  # guidance changed the images


def test_a_lora_student_exports_merged_weights_and_its_peft_file_loads_back(den, tmp_path):
    from safetensors import safe_open

    fam = family_of(den)
    student = apply_lora(copy.deepcopy(den), rank=4, alpha=8, target_modules=LORA_TARGETS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the output
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    z, cond = _noise(den), fam.encode_condition(den, PROMPTS)
    with torch.no_grad():
        ours = _images(den, sample_ddim(student, z, cond, 4, spacing="trailing"))
        base = _images(den, sample_ddim(den, z, cond, 4, spacing="trailing"))
    assert (ours - base).abs().max() > 1e-3
    out = tmp_path / "student"
    save_student(student, out, SamplerSpec(few_step=FewStep("ddim", 4, "trailing")).to_extra())
    # the pipeline folder holds the merged transformer: diffusers loads it with no LoRA loader
    assert (_pipeline_images(out, z, 4) - ours).abs().max() <= TOL
    with safe_open(str(out / "lora" / LORA_WEIGHTS), framework="pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    assert (out / "lora" / "pytorch_lora_weights_kohya.safetensors").is_file()
    # our peft loader puts the same adapter on a fresh teacher
    fresh = load_lora(load_denoiser("tiny:pixart"), out / "lora")
    with torch.no_grad():
        again = _images(den, sample_ddim(fresh, z, cond, 4, spacing="trailing"))
        merged = load_denoiser(out)
        exported = _images(den, sample_ddim(merged, z, cond, 4, spacing="trailing"))
    assert (again - ours).abs().max() <= TOL and (exported - ours).abs().max() <= TOL
    assert family_of(merged) is fam


def test_a_pixart_sigma_folder_loads_and_exports(den, tmp_path):
    from diffusers import PixArtSigmaPipeline

    alpha = FAMILIES["pixart"].tiny_pipeline()
    PixArtSigmaPipeline(**alpha.components).save_pretrained(str(tmp_path / "sigma"))
    sigma = load_denoiser(tmp_path / "sigma")
    assert type(sigma.frontend.pipe).__name__ == "PixArtSigmaPipeline"
    z, cond = _noise(sigma), family_of(sigma).encode_condition(sigma, PROMPTS)
    assert torch.equal(cond.embeds, family_of(den).encode_condition(den, PROMPTS).embeds)
    t = _sim_t(sigma)
    with torch.no_grad():
        ours = _images(sigma, one_step(sigma, z, cond, t, "sigma"))
    save_denoiser(sigma, tmp_path / "export", SamplerSpec(one_step=OneStepCall(t, NoiseInput.sigma)).to_extra())
    theirs = _pipeline_images(tmp_path / "export", z, 1)
    assert type(theirs) is torch.Tensor and (theirs - ours).abs().max() <= TOL


def test_at_sample_size_128_alpha_passes_resolution_and_aspect_ratio(tmp_path):
    """PixArt-alpha 1024 px: the pipeline feeds the default image size as micro-conditions."""
    from diffusers import PixArtTransformer2DModel

    pipe = FAMILIES["pixart"].tiny_pipeline()
    torch.manual_seed(0)
    # the size embeddings take a third of the inner dim each: 3 heads x 8
    net = PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=1, cross_attention_dim=24, sample_size=128, patch_size=2,
                                   caption_channels=32)
    assert net.use_additional_conditions
    pipe.register_modules(transformer=net.eval())
    pipe.save_pretrained(str(tmp_path / "alpha128"))
    den = load_denoiser(tmp_path / "alpha128")
    fam = family_of(den)
    cond = fam.encode_condition(den, PROMPTS[:1])
    assert cond.extra["resolution"].tolist() == [[512.0, 512.0]] and cond.extra["aspect_ratio"].tolist() == [[1.0]]
    assert set(fam.null_condition(den, 1).extra) == {"resolution", "aspect_ratio"}  # CFG cats both
    z = _noise(den, n=1)
    with torch.no_grad():
        ours = _images(den, one_step(den, z, cond, 399, "unit"))
    save_denoiser(den, tmp_path / "export", SamplerSpec(one_step=OneStepCall(399, NoiseInput.unit)).to_extra())
    from diffusers import DiffusionPipeline

    exported = DiffusionPipeline.from_pretrained(str(tmp_path / "export"))
    exported.set_progress_bar_config(disable=True)
    theirs = exported(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, latents=z, **PIPE_KW).images
    assert theirs.shape == (1, 3, 512, 512) and (theirs - ours).abs().max() <= TOL


def test_adversarial_taps_are_token_maps(den):
    from hyperscale.methods.adversarial import build_discriminator, teacher_features

    cond = family_of(den).encode_condition(den, PROMPTS)
    assert family_of(den).feature_channels(den) == [16, 16]  # the two blocks, inner dim 2 x 8
    feats = teacher_features(den, _noise(den), torch.tensor([100, 600]), cond)
    assert [f.shape for f in feats] == [(2, 16, 4, 4)] * 2  # 8 x 8 latents in 2 x 2 patches
    assert build_discriminator(den, hidden=8)(feats).shape == (2,)


@pytest.mark.parametrize("name", ["sim", "dmd"])
def test_sim_and_dmd_losses_are_finite_with_gradients_on_the_tiny_teacher(name):
    check_losses_train("pixart", name, {})
