"""The family contract on the class-conditional pixel UNet (``class_unet``): a tiny random-weight
instance built from config, exported and loaded back, its conditions, shapes, LoRA backbone and
feature taps."""
import torch

from hyperscale.config import load_config
from hyperscale.models.build import build_denoiser, load_denoiser, save_denoiser
from hyperscale.models.cond import Cond
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.families import FAMILIES, family_named, family_of
from hyperscale.models.lora import apply_lora

TINY = ["model.block_out_channels=[8,16]", "model.attention_levels=[false,true]", "model.num_classes=4"]


def _tiny():
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    return cfg, build_denoiser(cfg.model, cfg.schedule).eval()


def test_the_family_is_found_through_every_wrapper():
    cfg, den = _tiny()
    fam = family_named(cfg.model.family)
    assert fam is FAMILIES["class_unet"] and fam.bounded
    for wrapped in (den, CFGDenoiser(den, 2.0), apply_lora(den, rank=2, target_modules=["conv1"])):
        assert family_of(wrapped) is fam
        assert fam.sample_shape(wrapped) == (1, 28, 28)
        assert fam.backbone(wrapped) is den.unet


def test_conditions_and_the_null_condition():
    _, den = _tiny()
    fam = family_of(den)
    c = fam.encode_condition(den, [3, 0, 1])
    assert isinstance(c, Cond) and torch.equal(c.labels, torch.tensor([3, 0, 1])) and len(c) == 3
    assert torch.equal(fam.null_condition(den, 2).labels, torch.tensor([4, 4]))  # the null row of 4 classes
    assert fam.class_names(den) == ("class 0", "class 1", "class 2", "class 3")
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([10, 500, 999])
    with torch.no_grad():  # a Cond and its label-tensor shorthand are the same call; CFG cats Conds
        assert torch.equal(den(x, t, c), den(x, t, c.labels))
        guided = CFGDenoiser(den, 3.0)(x, t, c)
        uncond = den(x, t, fam.null_condition(den, 3))
        torch.testing.assert_close(guided, uncond + 3.0 * (den(x, t, c) - uncond), rtol=1e-5, atol=1e-5)


def test_export_and_load_round_trip(tmp_path):
    _, den = _tiny()
    save_denoiser(den, tmp_path / "e", {"note": 1})
    back = load_denoiser(tmp_path / "e")
    assert family_of(back).name == "class_unet"
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(back(x, t, y), den(x, t, y))
    assert torch.equal(back.schedule.alphas_cumprod, den.schedule.alphas_cumprod)


def test_features_stop_before_the_decoder():
    _, den = _tiny()
    fam = family_of(den)
    called = []
    handle = den.unet.up_blocks[0].register_forward_hook(lambda *a: called.append(1))
    feats = fam.features(den, torch.randn(2, 1, 28, 28), torch.tensor([10, 500]), torch.tensor([1, 2]))
    handle.remove()
    assert [f.shape[1] for f in feats] == fam.feature_channels(den) == [8, 16, 16] and not called
    unet = den.unet
    assert all(not b._forward_hooks for b in list(unet.down_blocks) + [unet.mid_block])  # hooks removed


def test_the_export_is_also_a_diffusers_folder(tmp_path):
    """UNet2DModel.from_pretrained(export, subfolder="unet") is the same network; the scheduler
    folder holds the same noise schedule (DDIM trailing, as the project's sampler)."""
    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel

    from hyperscale.models.build import save_denoiser

    _, den = _tiny()
    save_denoiser(den, tmp_path / "export")
    unet = UNet2DModel.from_pretrained(tmp_path / "export", subfolder="unet")
    sched = DDIMScheduler.from_pretrained(tmp_path / "export", subfolder="scheduler")
    assert torch.allclose(sched.alphas_cumprod.double(), den.schedule.alphas_cumprod, atol=1e-6)
    x, t, y = torch.randn(2, *family_of(den).sample_shape(den)), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(unet(x, t, class_labels=y).sample, den.unet(x, t, class_labels=y).sample)
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "export")).__name__ == "DDIMPipeline"
    assert "UNet2DModel.from_pretrained" in (tmp_path / "export" / "README.md").read_text()
