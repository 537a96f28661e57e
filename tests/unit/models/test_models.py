import json

import pytest
import torch

from hyperscale.config import load_config
from hyperscale.diffusion.schedule import Prediction, cfg_combine
from hyperscale.models.build import EXPORT_META, build_denoiser, load_denoiser, save_denoiser
from hyperscale.models.denoiser import CFGDenoiser, Denoiser
from hyperscale.models.ema import EMA

TINY = ["model.block_out_channels=[8,16]", "model.attention_levels=[false,true]"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    return build_denoiser(cfg.model, cfg.schedule).eval()


def _inputs(b=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, 28, 28, generator=g), torch.tensor([5, 100, 500, 999][:b]), torch.arange(b)


def test_protocol_and_prediction_conversions_are_consistent(model):
    assert isinstance(model, Denoiser)
    x, t, c = _inputs()
    with torch.no_grad():
        eps, x0, v, flow, score = (model(x, t, c, out=o) for o in Prediction)
        # continuous time (i + 1) / T is grid index i: the same call
        assert torch.equal(model(x, model.schedule.time(t), c), eps)
    ab = model.schedule.abar(t).float().view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    torch.testing.assert_close(a * x0 + s * eps, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v, a * eps - s * x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flow, eps - x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score, -eps / s)


def test_cfg_wrapper_is_the_guidance_combination(model):
    x, t, c = _inputs()
    with torch.no_grad():
        guided = CFGDenoiser(model, 3.0)(x, t, c)
        cond, uncond = model(x, t, c), model(x, t, model.null_cond(c))
    torch.testing.assert_close(guided, cfg_combine(uncond, cond, 3.0), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(CFGDenoiser(model, 1.0)(x, t, c), cond)


def test_cfg_interval_guides_only_the_noise_levels_inside_it(model):
    x, t, c = _inputs()  # t = 5, 100, 500, 999
    s = model.schedule.sigma_ve(t)
    lo, hi = float(s[0] + s[1]) / 2, float(s[2])  # (lo, hi] holds t = 100 and 500 only
    with torch.no_grad():
        got = CFGDenoiser(model, 3.0, (lo, hi))(x, t, c)
        guided = CFGDenoiser(model, 3.0)(x, t, c)
        cond = model(x, t, c)
    torch.testing.assert_close(got[1:3], guided[1:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[[0, 3]], cond[[0, 3]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided[[0, 3]], cond[[0, 3]], atol=1e-3)  # the levels outside would differ
    with pytest.raises(ValueError, match="guidance sigma range"):
        CFGDenoiser(model, 3.0, (2.0, 1.0))


def test_export_round_trip_is_exact_and_atomic(model, tmp_path):
    save_denoiser(model, tmp_path / "export", {"note": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dirs left behind
    meta = json.loads((tmp_path / "export" / EXPORT_META).read_text())
    assert meta["extra"] == {"note": "test"}
    loaded = load_denoiser(tmp_path / "export")
    x, t, c = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, c), model(x, t, c), atol=0, rtol=0)
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, model.schedule.alphas_cumprod)


def test_loading_a_non_export_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a hyperscale export .* nor a diffusers pipeline folder"):
        load_denoiser(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an export or pipeline directory"):
        load_denoiser(str(tmp_path / "missing"))


def test_pretrained_teacher_model_loads_the_export(model, tmp_path):
    save_denoiser(model, tmp_path / "t")
    cfg = load_config(None, TINY + [f"model.pretrained_teacher_model={tmp_path / 't'}"])
    again = build_denoiser(cfg.model, cfg.schedule)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_ema_tracks_with_warmup():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # first decay is min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.model.weight, net.weight - 0.1)


def test_unwrap_looks_through_engines_before_inner(model):
    """A DeepSpeed engine forwards unknown attributes (``inner`` too) to its module: unwrap must
    take the engine's ``module`` first, or it skips the LoRA wrapper inside it."""
    from torch import nn

    from hyperscale.models.denoiser import unwrap
    from hyperscale.models.lora import LoraDenoiser, apply_lora

    class ForwardingEngine(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    lora = apply_lora(model, rank=2, target_modules=["conv1"])
    engine = ForwardingEngine(lora)
    assert engine.inner is lora.inner  # the forwarding that hid the LoRA wrapper
    assert unwrap(engine, lambda m: isinstance(m, LoraDenoiser)) is lora
    assert unwrap(CFGDenoiser(engine, 2.0), lambda m: m is model) is model
    assert unwrap(engine, lambda m: False) is None
