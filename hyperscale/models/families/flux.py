"""Family ``flux``: FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``), a rectified-flow
MMDiT on 2 x 2-packed latents (families/flow.py for the schedule and exports).

The denoiser works on unpacked latents (B, C, H, W) like every family; ``call`` packs them into
(B, H W / 4, 4 C) tokens with their position ids, feeds the transformer sigma (the pipeline
passes timestep / 1000) and unpacks its output. Conditions: ``embeds`` (B, L, D) T5 states and
``pooled`` (B, D') the CLIP text encoder's pooled output; the null condition is the empty
prompt's embedding (the pipeline's negative prompt "" under true CFG).

Guidance-distilled checkpoints (FLUX.1-dev: ``guidance_embeds``) take the guidance scale as an
input: ``Cond.extra["guidance"]`` (B,) per sample, else ``guidance`` below, the pipeline's
default ``guidance_scale``; an export must be sampled with the same ``guidance_scale``.

Resolution. The pipeline's default image is ``default_sample_size`` (128) x the VAE factor, i.e.
the VAE's ``sample_size``; the latent side is that over the VAE factor (FLUX.1: 1024 px -> 128),
and the dynamic shift is taken at that size (always pass height/width to the pipeline: its
default would be 1024 px for a tiny VAE too).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from hyperscale.models.cond import Cond
from hyperscale.models.families import tiny
from hyperscale.models.families.flow import FlowFamily
from hyperscale.models.families.text2image import TextToImageFamily, inner


def _pipeline_class():
    from diffusers import FluxPipeline

    return FluxPipeline


class Flux(FlowFamily, TextToImageFamily):
    name = "flux"
    backbone_name = "transformer"
    pipeline_classes = ("FluxPipeline",)
    spacing = "trailing"  # the pipeline passes sigmas 1, (n-1)/n, ..., 1/n
    guidance = 3.5  # the guidance embedding's default (FluxPipeline's guidance_scale)

    def latent_size(self, net: nn.Module, path: Path) -> int:
        vae = json.loads((Path(path) / "vae" / "config.json").read_text())
        return int(vae["sample_size"]) // 2 ** (len(vae["block_out_channels"]) - 1)

    def image_seq_len(self, net: nn.Module, latent_size: int) -> int:
        return (latent_size // 2) ** 2

    def sample_shape(self, denoiser: nn.Module) -> tuple[int, ...]:
        d = inner(denoiser)
        side = d.frontend.sample_size
        return (int(d.net.config.in_channels) // 4, side, side)

    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device)
        return Cond(embeds=embeds, pooled=pooled)

    def null_prompt(self, pipe, device) -> Cond:
        return self.encode_prompts(pipe, [""], device)

    def call(self, net: nn.Module, x_t: Tensor, model_t: Tensor, cond: Cond) -> Tensor:
        pipe = _pipeline_class()
        B, C, H, W = x_t.shape
        if H % 2 or W % 2:
            raise ValueError(f"FLUX packs 2 x 2 latent patches: the latent side must be even, got {H} x {W}")
        guidance = None
        if net.config.guidance_embeds:
            guidance = cond.extra.get("guidance")
            guidance = torch.full((B,), self.guidance) if guidance is None else guidance
            guidance = guidance.to(x_t.device, torch.float32)
        out = net(hidden_states=pipe._pack_latents(x_t, B, C, H, W), timestep=model_t.to(x_t.dtype) / 1000,
                  guidance=guidance, pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                  txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                  img_ids=pipe._prepare_latent_image_ids(B, H // 2, W // 2, x_t.device, x_t.dtype),
                  return_dict=False)[0]
        return pipe._unpack_latents(out, H, W, 1)  # scale factor 1: H, W are latent sides already

    def kohya_state_dict(self, denoiser: nn.Module, state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
        """BFL module names, which kohya's sd-scripts, ComfyUI and diffusers' FLUX reader use (flux_kohya.py)."""
        from hyperscale.models.families.flux_kohya import bfl_state_dict

        return bfl_state_dict(self.backbone(denoiser), state, alpha)

    def feature_channels(self, denoiser: nn.Module) -> list[int]:
        raise NotImplementedError(f"family {self.name} has no adversarial feature taps yet (method.adversarial=false)")

    def tiny_pipeline(self):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(0)
        # 4 latent channels packed 2 x 2 -> 16; rope axes sum to the head dim; guidance-distilled like FLUX.1-dev
        net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        vae = tiny.vae(quant_convs=False, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE factors
        return FluxPipeline(transformer=net.eval(), scheduler=scheduler, vae=vae,
                            text_encoder=tiny.clip_text_encoder(seed=1), tokenizer=tiny.clip_tokenizer(),
                            text_encoder_2=tiny.t5_encoder(d_model=32, seed=2), tokenizer_2=tiny.t5_tokenizer())
