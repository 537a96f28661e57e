"""The Ray-free generation path: request validation, class resolution, determinism, encoding."""
import io

import pytest
import torch
from PIL import Image

from hyperscale.storage.local import REPO
from hyperscale.diffusion.sampling import sample_tcd
from hyperscale.models.build import save_denoiser
from hyperscale.models.lora import load_lora
from tiny_exports import tiny_exports
from hyperscale.models.generation import (GenerateRequest, ImageGenerator, Limits, RequestError, encode_image,
                                          resolve_class)

NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return tiny_exports(tmp_path_factory.mktemp("exports"))


def req(**kw):
    return GenerateRequest.model_validate(kw)


def test_class_from_index_name_or_prompt():
    assert resolve_class(req(**{"class": 7}), NAMES) == 7
    assert resolve_class(req(**{"class": "Sneaker"}), NAMES) == 7
    assert resolve_class(req(**{"class": "top"}), NAMES) == 0  # a part of "t-shirt/top"
    assert resolve_class(req(prompt="A photo of an ankle boot"), NAMES) == 9
    assert resolve_class(req(prompt="a t-shirt"), NAMES) == 0  # the longest name wins over "shirt"
    assert resolve_class(req(prompt="a shirt"), NAMES) == 6
    assert resolve_class(req(**{"class": 7, "prompt": "a sneaker"}), NAMES) == 7
    for bad, match in [({}, "give 'class'"), ({"class": 10}, "out of range"), ({"class": "cat"}, "not a known"),
                       ({"prompt": "a cat"}, "names no known class"), ({"class": 8, "prompt": "a sneaker"}, "but class")]:
        with pytest.raises(RequestError, match=match):
            resolve_class(req(**bad), NAMES)


def test_request_schema_rejects_bad_fields():
    for bad in [{"num_images": 0}, {"seed": -1}, {"steps": 0}, {"eta": 1.5}, {"format": "gif"}, {"unknown": 1},
                {"adapter": "../etc"}, {"guidance_scale": 0.5}]:
        with pytest.raises(ValueError):
            req(**bad)


def test_limits_and_model_kind_are_enforced(exports):
    one, multi = ImageGenerator.load(exports[0]), ImageGenerator.load(exports[1])
    lim = Limits(max_images_per_request=4, max_steps=8, max_prompt_chars=20, max_size=64)
    for bad, match in [({"class": 1, "num_images": 5}, "num_images"), ({"class": 1, "steps": 9}, "steps"),
                       ({"prompt": "a sneaker " * 5}, "prompt"), ({"class": 1, "size": 65}, "size"),
                       ({"class": 1, "num_images": 2, "response": "image"}, "response")]:
        with pytest.raises(RequestError, match=match):
            multi.prepare(req(**bad), lim)
    for bad in [{"steps": 2}, {"eta": 0.1}, {"guidance_scale": 2.0}, {"sampler": "ddim"}]:
        with pytest.raises(RequestError, match="1-step generator"):
            one.prepare(req(**{"class": 1, **bad}), lim)
    with pytest.raises(RequestError, match="eta"):
        multi.prepare(req(**{"class": 1, "sampler": "ddim", "eta": 0.2}), lim)
    assert one.describe()["kind"] == "one-step" and multi.describe()["kind"] == "multi-step"
    assert one.describe()["classes"] == list(NAMES)


@pytest.mark.parametrize("which", [0, 1])
def test_same_seed_same_images_whatever_the_batch(exports, which):
    gen, lim = ImageGenerator.load(exports[which]), Limits()
    extra = {} if which == 0 else {"steps": 3, "eta": 0.6}  # TCD with eta > 0 draws noise at every step
    a = gen.prepare(req(**{"class": 2, "num_images": 3, "seed": 11, **extra}), lim)
    b = gen.prepare(req(**{"class": 5, "num_images": 2, "seed": 12, **extra}), lim)
    alone = gen.generate([a])[0]
    together = gen.generate([b, a])
    assert alone.shape == (3, 1, 28, 28)
    torch.testing.assert_close(together[1], alone, rtol=1e-4, atol=1e-4)  # batch size changes float rounding only
    assert not torch.allclose(together[0][:1], alone[:1])  # other seed, other class: other images
    # image i of seed s is image 0 of seed s + i
    shifted = gen.generate([gen.prepare(req(**{"class": 2, "seed": 12, **extra}), lim)])[0]
    torch.testing.assert_close(shifted[0], alone[1], rtol=1e-4, atol=1e-4)  # batch size changes float rounding only
    unseeded = gen.prepare(req(**{"class": 2}), lim)
    assert unseeded.seed >= 0


def test_per_sample_generators_match_one_generator_per_image(exports):
    den = ImageGenerator.load(exports[1]).model
    z = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    both = sample_tcd(den, z, y, 3, eta=0.7, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    first = sample_tcd(den, z[:1], y[:1], 3, eta=0.7, generator=[torch.Generator().manual_seed(5)])
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-4)  # batch size changes float rounding only
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        sample_tcd(den, z[:1], y[:1], 3, eta=0.7, generator=[torch.Generator()] * 2)


def test_encode_png_and_jpeg_at_the_requested_size():
    x = torch.linspace(-1, 1, 28 * 28).reshape(1, 28, 28)
    png = Image.open(io.BytesIO(encode_image(x, "png")))
    assert png.format == "PNG" and png.size == (28, 28)
    assert abs(int(png.getpixel((0, 0))) - 0) <= 1 and abs(int(png.getpixel((27, 27))) - 255) <= 1
    jpg = Image.open(io.BytesIO(encode_image(x, "jpeg", size=112)))
    assert jpg.format == "JPEG" and jpg.size == (112, 112)


def test_lora_adapter_is_applied_to_its_base_and_merged(exports):
    root = exports[0].parent
    with pytest.raises(FileNotFoundError, match="lora_base"):
        ImageGenerator.load(root / "lora")
    gen = ImageGenerator.load(root / "lora", "lora", lora_base=exports[1])
    base = ImageGenerator.load(exports[1])
    assert gen.describe()["kind"] == "multi-step"
    r = req(**{"class": 4, "num_images": 2, "seed": 3, "steps": 2, "eta": 0.0})
    x, b = gen.generate([gen.prepare(r, Limits())])[0], base.generate([base.prepare(r, Limits())])[0]
    assert (x - b).abs().max() > 1e-3  # the adapter changes the model
    ref_model = load_lora(ImageGenerator.load(exports[1]).model, root / "lora")  # unmerged, in place
    z = torch.stack([torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    ref = sample_tcd(ref_model, z, torch.tensor([4, 4]), 2, eta=0.0)
    torch.testing.assert_close(x, ref.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    assert not any("lora" in n for n, _ in gen.model.named_parameters())  # merged: plain weights


def test_unified_export_samples_its_own_one_step_call_at_one_step(exports, tmp_path):
    """A Hyper-SD unified export (extra.multi_step) with the DMD phase's generator call: TCD at 1
    step is that call (timestep 440, x_t = sigma_t z), at 2+ steps plain TCD; the same weights
    without multi_step load as a 1-step-only generator, as before."""
    from hyperscale.models.build import load_denoiser
    from hyperscale.models.generator import OneStepGenerator

    den = load_denoiser(exports[1])
    call = {"timestep": 440, "noise_input": "sigma"}
    save_denoiser(den, tmp_path / "unified", {"generator": call, "multi_step": True})
    gen = ImageGenerator.load(tmp_path / "unified")
    d = gen.describe()
    assert d["kind"] == "multi-step" and d["one_step_call"] == call
    z = torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(5))[None]
    x1 = gen.generate([gen.prepare(req(**{"class": 2, "seed": 5, "steps": 1}), Limits())])[0]
    torch.testing.assert_close(x1, OneStepGenerator(den, 440, "sigma")(z, torch.tensor([2])).clamp(-1, 1))
    trailing = sample_tcd(den, z, torch.tensor([2]), 1, eta=0.3).clamp(-1, 1)
    assert (x1 - trailing).abs().max() > 1e-2  # not the trailing T - 1 call
    x2 = gen.generate([gen.prepare(req(**{"class": 2, "seed": 5, "steps": 2, "eta": 0.0}), Limits())])[0]
    torch.testing.assert_close(x2, sample_tcd(den, z, torch.tensor([2]), 2, eta=0.0).clamp(-1, 1))
    save_denoiser(den, tmp_path / "dmd-only", {"generator": call})
    assert ImageGenerator.load(tmp_path / "dmd-only").describe()["kind"] == "one-step"


def test_sampler_spec_reads_and_writes_the_shipped_export_keys():
    """SamplerSpec round-trips the ``extra`` keys exports carry (the shipped SIM generator's included),
    and its one rule for multi-step exports: TCD at 1 step uses the export's own call."""
    import json

    from hyperscale.models.export import FewStep, OneStepCall, SamplerSpec

    shipped = json.loads((REPO / "assets/sim-generator/hyperscale_model.json")
                         .read_text())["extra"]
    spec = SamplerSpec.from_extra(shipped)
    assert spec.is_one_step_generator and spec.one_step == OneStepCall(440, "sigma")
    assert spec.to_extra() == shipped
    tscd = SamplerSpec(one_step=OneStepCall(999), few_step=FewStep("ddim", 1), notes={"tscd": {"segments": 1}})
    assert SamplerSpec.from_extra(tscd.to_extra()) == tscd
    unified = tscd.unified()
    assert not unified.is_one_step_generator and unified.to_extra()["multi_step"] is True
    assert unified.one_step_at(1, "tcd") == OneStepCall(999) and unified.one_step_at(1, "ddim") is None
    assert unified.one_step_at(2, "tcd") is None and tscd.one_step_at(1, "tcd") is None


def test_class_models_describe_themselves_and_refuse_text_only_fields(exports):
    """The model-info record says what a class model takes; height / width are its one size;
    prompt lists and negative prompts are for text-to-image models."""
    gen, lim = ImageGenerator.load(exports[0]), Limits()
    d = gen.describe()
    assert d["family"] == "class_unet" and d["takes"] == "classes" and d["default_steps"] == 1
    assert d["sizes"] == {"default": [28, 28], "heights": [28], "widths": [28]}
    assert gen.prepare(req(**{"class": 1, "height": 28, "width": 28}), lim).settings[0] == (1, 28, 28)
    for bad, match in [({"height": 32}, "height: 32 is not a size"), ({"prompt": ["a bag"]}, "list of prompts"),
                       ({"negative_prompt": "a bag"}, "negative_prompt")]:
        with pytest.raises(RequestError, match=match):
            gen.prepare(req(**{"class": 1, **bad}), lim)
