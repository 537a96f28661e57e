"""Tiny random exports shared by the generation and serving tests (``from tiny_exports import
tiny_exports, tiny_text_exports``; tests/ is on the import path through its conftest)."""
import copy

import torch

from hyperscale.config import load_config
from hyperscale.methods.sim import Sim, SimConfig
from hyperscale.models.build import build_denoiser, save_denoiser
from hyperscale.models.lora import apply_lora, save_lora


def tiny_exports(root):
    """(1-step generator export, multi-step denoiser export) of one tiny random UNet, and beside
    them ``lora/``: a diffusers-format LoRA adapter (non-zero) for the multi-step one."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    den = build_denoiser(cfg.model, cfg.schedule)
    save_denoiser(den, root / "one-step", Sim(SimConfig()).sampler(den).to_extra())
    save_denoiser(den, root / "multi-step")
    lora = apply_lora(copy.deepcopy(den), rank=2, target_modules=["conv1", "conv2"])
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_lora(lora, root / "lora")
    return root / "one-step", root / "multi-step"


def tiny_text_exports(root, source: str = "tiny:sd15"):
    """Exports of a tiny sd15 pipeline (``source``, by default ``tiny:sd15``): ``one-step`` (a SIM-like 1-step
    generator at sigma~ = 2.5, x_t = sigma_t z), ``multi-step`` (a Hyper-SD-like unified export,
    TCD) and ``lora-student`` (a LoRA student of it, non-zero LoRA, ``save_student``'s layout:
    merged weights + ``lora/``). Returns a dict of their paths."""
    from hyperscale.models.build import load_denoiser
    from hyperscale.models.export import FewStep, OneStepCall, SamplerSpec
    from hyperscale.models.lora import save_student

    den = load_denoiser(source)
    t = den.schedule.timestep_for_sigma_ve(2.5)
    paths = {"one-step": root / "one-step", "multi-step": root / "multi-step", "lora-student": root / "lora-student"}
    save_denoiser(den, paths["one-step"], SamplerSpec(one_step=OneStepCall(t, "sigma")).to_extra())
    multi = SamplerSpec(few_step=FewStep("tcd", 4)).unified().to_extra()
    save_denoiser(den, paths["multi-step"], multi)
    torch.manual_seed(1)
    lora = apply_lora(copy.deepcopy(den), rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_student(lora, paths["lora-student"], multi)
    return paths


def reference_one_step(source, prompt: str, seed: int, shape=(4, 8, 8)):
    """What our sampler gives a 1-step text export for (prompt, seed): the family's decode of
    ``one_step`` at the export's call on the seed's noise, (1, 3, H, W) in [-1, 1]."""
    from hyperscale.diffusion.sampling import one_step
    from hyperscale.models.build import load_denoiser
    from hyperscale.models.families import family_of
    from hyperscale.models.generator import export_sampler

    den = load_denoiser(source)
    fam, call = family_of(den), export_sampler(source).one_step
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None]
    with torch.no_grad():
        x = one_step(den, z, fam.encode_condition(den, [prompt]), call.timestep, call.noise_input)
        return fam.decode(den, x).clamp(-1, 1)


def to_pixels(x):
    """An image (3, H, W) in [-1, 1] -> (H, W, 3) int16 pixel levels, as the server encodes them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy().astype("int16")
