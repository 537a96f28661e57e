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


def tiny_text_exports(root):
    """Exports of the tiny random sd15 pipeline (``tiny:sd15``): ``one-step`` (a SIM-like 1-step
    generator at sigma~ = 2.5, x_t = sigma_t z), ``multi-step`` (a Hyper-SD-like unified export,
    TCD) and ``lora-student`` (a LoRA student of it, non-zero LoRA, ``save_student``'s layout:
    merged weights + ``lora/``). Returns a dict of their paths."""
    from hyperscale.models.build import load_denoiser
    from hyperscale.models.export import FewStep, OneStepCall, SamplerSpec
    from hyperscale.models.lora import save_student

    den = load_denoiser("tiny:sd15")
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
