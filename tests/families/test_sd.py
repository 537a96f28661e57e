"""Families sd15 and sdxl on tiny pipelines built from config: conditions, exports that diffusers
samples exactly as the project does (1-step SIM and DMD calls, DDIM with CFG, TCD), LoRA files
through load_lora_weights / fuse_lora / the kohya reader, and the errors bad sources get."""
import pytest
import torch

from t2i_checks import PROMPTS, check_export, check_lora_export
from hyperscale.models.build import load_denoiser, resolve_source, save_denoiser
from hyperscale.models.export import FewStep, OneStepCall, SamplerSpec
from hyperscale.models.families import family_named, family_of
from hyperscale.models.lora import apply_lora, save_student

FAMILIES = ["sd15", "sdxl"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_pipeline_conditions(name):
    den = load_denoiser(f"tiny:{name}")
    fam = family_of(den)
    assert fam is family_named(name) and fam.condition == "text" and fam.image_side(den) == 32
    cond = fam.encode_condition(den, PROMPTS + PROMPTS[:1])
    assert len(cond) == 3 and torch.equal(cond.embeds[0], cond.embeds[2])  # one cache row per prompt
    assert not torch.equal(cond.embeds[0], cond.embeds[1])
    pipe = den.frontend.pipe
    if name == "sdxl":
        assert cond.pooled.shape == (3, 32) and cond.extra["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
        _, neg, _, neg_pooled = pipe.encode_prompt(["x"], device="cpu", do_classifier_free_guidance=True)
        null = fam.null_condition(den, 2)
        assert torch.equal(null.embeds[0], neg[0]) and torch.equal(null.pooled[0], neg_pooled[0])
        assert float(null.embeds.abs().max()) == 0.0  # force_zeros_for_empty_prompt
    else:
        _, neg = pipe.encode_prompt(["x"], "cpu", 1, True)
        assert torch.equal(fam.null_condition(den, 2).embeds[1], neg[0])
    with pytest.raises(TypeError, match="prompts, not class labels"):
        fam.encode_condition(den, torch.tensor([1, 2]))


@pytest.mark.parametrize("name", FAMILIES)
def test_exports_sample_in_diffusers_as_in_hyperscale(name, tmp_path):
    den = load_denoiser(f"tiny:{name}")
    t_sim = den.schedule.timestep_for_sigma_ve(2.5)
    specs = {"sim": (SamplerSpec(one_step=OneStepCall(t_sim, "sigma")), 1.0),
             "dmd": (SamplerSpec(one_step=OneStepCall(999, "unit")), 1.0),
             "ddim-cfg": (SamplerSpec(few_step=FewStep("ddim", 4, guidance_scale=2.0)), 2.0),
             "tcd": (SamplerSpec(few_step=FewStep("tcd", 4)).unified(), 1.0)}
    for kind, (spec, guidance) in specs.items():
        save_denoiser(den, tmp_path / kind, spec.to_extra())
        check_export(tmp_path / kind, guidance=guidance)
    card = (tmp_path / "sim" / "README.md").read_text()
    assert "DiffusionPipeline.from_pretrained" in card and "num_inference_steps=1" in card


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_files_load_in_diffusers(name, tmp_path):
    den = load_denoiser(f"tiny:{name}")
    student = apply_lora(den, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # a LoRA that changes the images
    spec = SamplerSpec(one_step=OneStepCall(999, "unit"))
    save_student(student, tmp_path / "export", spec.to_extra())
    assert (tmp_path / "export" / "lora" / "pytorch_lora_weights_kohya.safetensors").is_file()
    check_export(tmp_path / "export")
    diffs = check_lora_export(tmp_path / "export", f"tiny:{name}")
    assert set(diffs) == {"diffusers", "fused", "kohya"}


def test_bad_sources_get_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a hyperscale export .* nor a diffusers pipeline"):
        load_denoiser(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not fetch it from the Hugging Face hub.*offline"):
        resolve_source("stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(ValueError, match="holds a StableDiffusionXLPipeline, not a sd15 pipeline"):
        family_named("sd15").load(resolve_source("tiny:sdxl"), None)
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        resolve_source("tiny:nope")


def test_sdxl_at_another_size_conditions_on_that_size():
    """SDXL's size time ids follow the latent size (as the pipeline's height/width do)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from hyperscale.diffusion.sampling import sample_ddim

    den = load_denoiser("tiny:sdxl")
    fam = family_of(den)
    pipe = DiffusionPipeline.from_pretrained(str(resolve_source("tiny:sdxl")))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, latents=z.clone(), height=64, width=48,
               output_type="pt").images
    with torch.no_grad():
        x = sample_ddim(den, z, fam.encode_condition(den, PROMPTS[:1]), 2, spacing="trailing")
        ours = ((fam.decode(den, x) + 1) / 2).clamp(0, 1)
    assert (ref - ours).abs().max() < 1e-5


def test_a_pipeline_folder_loads_from_s3(moto):
    """model.pretrained_teacher_model=s3://...: the folder is downloaded once into the cache and
    loads as the local one (network weights and prompt conditions equal)."""
    from s3_server import BUCKET
    from hyperscale.storage import s3

    local = resolve_source("tiny:sd15")
    s3.upload_dir(local, f"s3://{BUCKET}/teachers/sd15")
    den, ref = load_denoiser(f"s3://{BUCKET}/teachers/sd15"), load_denoiser(local)
    assert family_of(den).name == "sd15"
    assert all(torch.equal(a, b) for a, b in zip(den.state_dict().values(), ref.state_dict().values()))
    assert torch.equal(family_of(den).encode_condition(den, PROMPTS).embeds,
                       family_of(ref).encode_condition(ref, PROMPTS).embeds)
