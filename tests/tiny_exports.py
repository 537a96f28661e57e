"""Tiny random exports shared by the generation and serving tests (``from tiny_exports import
tiny_exports``; tests/ is on the import path through its conftest)."""
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
