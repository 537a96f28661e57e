"""The Ray-free generation path for text-to-image exports (tiny random sd15 pipelines): images
equal the sampler's for a seed, prompts and sizes are checked, guidance runs against the null or
a negative prompt, LoRA-only adapters apply to their base and share its frontend."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from hyperscale.diffusion.sampling import sample_tcd
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.families import family_of
from hyperscale.models.families.text2image import inner
from hyperscale.models.generation import GenerateRequest, ImageGenerator, Limits, RequestError
from hyperscale.models.text_generation import SizeRule
from tiny_exports import reference_one_step, tiny_text_exports, to_pixels

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_text_exports(tmp_path_factory.mktemp("t2i"))


@pytest.fixture(scope="module")
def one(paths):
    return ImageGenerator.load(paths["one-step"])


@pytest.fixture(scope="module")
def multi(paths):
    return ImageGenerator.load(paths["multi-step"])


def req(**kw):
    return GenerateRequest.model_validate(kw)


def noise(seed: int, shape=(4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_describe_says_family_prompts_sizes_and_steps(one, multi):
    d = one.describe()
    assert d["family"] == "sd15" and d["takes"] == "prompts" and d["kind"] == "one-step"
    assert d["sizes"] == {"default": [32, 32], "heights": [32, 64], "widths": [32, 64]}  # VAE x4, UNet latent 8
    assert d["default_steps"] == 1 and d["image_shape"] == [3, 32, 32] and d["classes"] == []
    m = multi.describe()
    assert m["kind"] == "multi-step" and m["default_steps"] == 4 and m["negative_prompt"] is True


def test_a_prompt_gives_the_one_step_call_decoded(one, paths):
    job = one.prepare(req(prompt="a photo of a sneaker", seed=7), Limits())
    x = one.generate([job])[0]
    assert x.shape == (1, 3, 32, 32)
    ref = reference_one_step(paths["one-step"], "a photo of a sneaker", 7)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    png = one.render(job, x)[0]
    assert np.abs(pixels(png) - to_pixels(ref[0])).max() <= 1  # within 1/255 after PNG encoding
    assert one.result_fields(job) == {"prompts": ["a photo of a sneaker"], "height": 32, "width": 32}


def test_a_list_of_prompts_is_prompt_major_and_seeded_per_image(one, paths):
    prompts = ["a photo of a sneaker", "a red bag"]
    job = one.prepare(req(prompt=prompts, num_images=2, seed=3), Limits())
    x = one.generate([job])[0]
    assert x.shape == (4, 3, 32, 32) and job.prompts == ("a photo of a sneaker",) * 2 + ("a red bag",) * 2
    for k, prompt in enumerate(job.prompts):  # image k: that prompt, seed 3 + k
        torch.testing.assert_close(x[k:k + 1], reference_one_step(paths["one-step"], prompt, 3 + k),
                                   rtol=1e-4, atol=1e-4)  # batch size changes float rounding only


def test_sizes_are_the_models_and_others_are_refused_naming_them(one, paths):
    job = one.prepare(req(prompt="a coat", seed=2, height=64, width=32), Limits())
    x = one.generate([job])[0]
    assert x.shape == (1, 3, 64, 32) and job.settings[0] == (4, 16, 8)
    torch.testing.assert_close(x, reference_one_step(paths["one-step"], "a coat", 2, (4, 16, 8)), rtol=1e-5, atol=1e-5)
    assert Image.open(io.BytesIO(one.render(job, x)[0])).size == (32, 64)  # PIL: (width, height)
    for bad, field in [({"height": 48}, "height: 48"), ({"width": 128}, "width: 128"), ({"height": 16}, "height: 16")]:
        with pytest.raises(RequestError, match=f"{field} is not a size .* one of 32, 64"):
            one.prepare(req(prompt="a coat", **bad), Limits())


def test_size_rules_of_real_checkpoints():
    """SD1.5 (latent 64, VAE x8, 3 upsamplers): multiples of 64 from 256 to 1024; SDXL (latent
    128): 512 to 2048; a network that is no UNet: its native size only."""
    sd15 = SizeRule.latent((4, 64, 64), 8, 3)
    assert sd15.default == (512, 512) and sd15.heights == tuple(range(256, 1025, 64)) == sd15.widths
    assert SizeRule.latent((4, 128, 128), 8, 3).heights == tuple(range(512, 2049, 64))
    assert SizeRule.latent((4, 64, 64), 8, None).heights == (512,)
    with pytest.raises(RequestError, match=r"height: 500 .* one of 256\.\.1024 in steps of 64"):
        sd15.sample_shape(req(prompt="a coat", height=500), "sd")
    assert sd15.sample_shape(req(prompt="a coat", height=768, width=512), "sd") == (4, 96, 64)


BAD = [
    ({"class": "sneaker"}, "takes prompts, not class names"),
    ({"class": 1, "prompt": "a bag"}, "takes prompts"),
    ({}, "prompt: required"),
    ({"prompt": []}, "empty list"),
    ({"prompt": "a bag", "negative_prompt": "red"}, "1-step generator"),
    ({"prompt": "a bag", "guidance_scale": 2.0}, "1-step generator"),
    ({"prompt": ["a", "b", "c"], "num_images": 2}, r"3 prompts x 2 = 6 images is over .* limit of 4"),
    ({"prompt": ["a bag", "x" * 21]}, r"prompt\[1\]: 21 characters"),
    ({"prompt": "a bag", "negative_prompt": "x" * 21}, "negative_prompt: 21 characters"),
    ({"prompt": ["a", "b"], "response": "image"}, "one image"),
]


@pytest.mark.parametrize("body,match", BAD, ids=[m for _, m in BAD])
def test_bad_requests_name_the_problem(one, body, match):
    with pytest.raises(RequestError, match=match):
        one.prepare(req(**body), Limits(max_images_per_request=4, max_prompt_chars=20))


def test_guidance_against_the_null_prompt_and_a_negative_prompt(multi):
    den, lim = multi.model, Limits()
    fam = family_of(den)
    base = {"prompt": "a coat", "seed": 1, "steps": 2, "eta": 0.0, "guidance_scale": 3.0}
    guided = multi.generate([multi.prepare(req(**base), lim)])[0]
    with torch.no_grad():  # the family's null condition through the plain CFGDenoiser
        ref = fam.decode(den, sample_tcd(CFGDenoiser(den, 3.0), noise(1), fam.encode_condition(den, ["a coat"]), 2,
                                         eta=0.0)).clamp(-1, 1)
    torch.testing.assert_close(guided, ref, rtol=1e-5, atol=1e-5)
    negative = multi.generate([multi.prepare(req(**base, negative_prompt="a red bag"), lim)])[0]
    empty = multi.generate([multi.prepare(req(**base, negative_prompt=""), lim)])[0]
    assert (negative - guided).abs().max() > 1e-3  # the negative prompt steers
    torch.testing.assert_close(empty, guided)  # an empty negative prompt is the null prompt, as in the pipelines
    with pytest.raises(RequestError, match="negative_prompt: applies with classifier-free guidance"):
        multi.prepare(req(prompt="a coat", negative_prompt="a red bag"), lim)
    # requests of other prompts, sizes and negatives batch together and keep their own images
    other = multi.prepare(req(prompt="a bag", seed=5, steps=2, eta=0.0, guidance_scale=3.0, negative_prompt="blue"),
                          lim)
    together = multi.generate([other, multi.prepare(req(**base), lim)])
    torch.testing.assert_close(together[1], guided, rtol=1e-4, atol=1e-4)


def test_lora_adapter_applies_to_its_base_and_shares_its_frontend(paths, multi):
    adapter = ImageGenerator.load(paths["lora-student"] / "lora", "lora", lora_base=paths["multi-step"])
    assert adapter.describe()["family"] == "sd15" and adapter.describe()["takes"] == "prompts"
    assert inner(adapter.denoiser).frontend is inner(multi.denoiser).frontend  # one pipeline's encoders and VAE
    assert not any("lora" in n for n, _ in adapter.model.named_parameters())  # merged: plain weights
    r = req(prompt="a photo of a sneaker", seed=4, steps=2, eta=0.0)
    x = adapter.generate([adapter.prepare(r, Limits())])[0]
    student = ImageGenerator.load(paths["lora-student"])  # the same LoRA, merged by save_student
    torch.testing.assert_close(x, student.generate([student.prepare(r, Limits())])[0], rtol=1e-4, atol=1e-4)
    assert (x - multi.generate([multi.prepare(r, Limits())])[0]).abs().max() > 1e-3  # the LoRA changes images


def test_a_rectified_flow_export_samples_with_euler(tmp_path):
    """SD3 (tiny): multi-step requests run Euler on the flow path (the exported sampler), tcd is refused."""
    from hyperscale.diffusion.sampling import sample_euler
    from hyperscale.models.build import load_denoiser, save_denoiser
    from hyperscale.models.export import FewStep, SamplerSpec
    from hyperscale.models.families import family_of

    den = load_denoiser("tiny:sd3")
    save_denoiser(den, tmp_path / "sd3", SamplerSpec(few_step=FewStep("euler", 2, den.schedule.spacing)).to_extra())
    gen = ImageGenerator.load(tmp_path / "sd3")
    assert gen.describe()["samplers"] == ["euler", "tcd"]
    job = gen.prepare(req(prompt="a photo of a bag", seed=3, steps=2), Limits())
    x = gen.generate([job])[0]
    fam = family_of(den)
    with torch.no_grad():
        z = torch.randn(fam.sample_shape(den), generator=torch.Generator().manual_seed(3))[None]
        ref = fam.decode(den, sample_euler(den, z, fam.encode_condition(den, ["a photo of a bag"]), 2)).clamp(-1, 1)
    assert (x - ref).abs().max() < 1e-5
    with pytest.raises(RequestError, match="samples with euler or tcd"):
        gen.prepare(req(prompt="a bag", sampler="ddim"), Limits())
    tcd = gen.generate([gen.prepare(req(prompt="a photo of a bag", seed=3, steps=2, sampler="tcd", eta=0.0), Limits())])[0]
    assert (tcd - x).abs().max() < 1e-5  # TCD at eta 0 is the Euler sampler
