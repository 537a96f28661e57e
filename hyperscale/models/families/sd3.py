"""Family ``sd3``: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``),
a rectified-flow MMDiT (families/flow.py for the schedule and exports).

Conditions: ``embeds`` (B, 2 L_clip + L_t5, D), the joint text sequence the pipeline builds from
CLIP-L and CLIP-G penultimate states (concatenated, zero-padded to the T5 width D) followed by
T5's states, and ``pooled`` (B, 2 x projection), both CLIPs' pooled projections. The null
condition is the pipeline's negative embedding of the empty prompt. The transformer is fed
1000 sigma as its timestep, as the pipeline passes the scheduler's timesteps.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hyperscale.models.cond import Cond
from hyperscale.models.families import tiny
from hyperscale.models.families.flow import FlowFamily
from hyperscale.models.families.text2image import TextToImageFamily


class SD3(FlowFamily, TextToImageFamily):
    name = "sd3"
    backbone_name = "transformer"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    spacing = "linspace"  # the pipeline calls set_timesteps(n) without sigmas

    def image_seq_len(self, net: nn.Module, latent_size: int) -> int:
        return (latent_size // int(net.config.patch_size)) ** 2

    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False)
        return Cond(embeds=embeds, pooled=pooled)

    def null_prompt(self, pipe, device) -> Cond:
        _, negative, _, negative_pooled = pipe.encode_prompt([""], None, None, device=device,
                                                             do_classifier_free_guidance=True)
        return Cond(embeds=negative, pooled=negative_pooled)

    def call(self, net: nn.Module, x_t: Tensor, model_t: Tensor, cond: Cond) -> Tensor:
        return net(hidden_states=x_t, timestep=model_t, encoder_hidden_states=cond.embeds,
                   pooled_projections=cond.pooled, return_dict=False)[0]

    def kohya_state_dict(self, denoiser: nn.Module, state: dict, alpha: float) -> None:
        """None: diffusers 0.42 reads no kohya file for SD3 (SD3LoraLoaderMixin loads diffusers/peft keys only;
        a ``lora_unet_`` file loads silently as nothing), so none is written."""
        return None

    def feature_channels(self, denoiser: nn.Module) -> list[int]:
        raise NotImplementedError(f"family {self.name} has no adversarial feature taps yet (method.adversarial=false)")

    def tiny_pipeline(self):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        torch.manual_seed(0)
        # the joint sequence is T5-wide (64): both CLIPs' states (32 + 32) are zero-padded to it;
        # pooled: both CLIPs' projections (32 + 32)
        net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                    caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=8)
        vae = tiny.vae(quant_convs=False, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE factors
        return StableDiffusion3Pipeline(
            transformer=net.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=tiny.clip_text_encoder(projection=True, seed=1), tokenizer=tiny.clip_tokenizer(),
            text_encoder_2=tiny.clip_text_encoder(projection=True, seed=2), tokenizer_2=tiny.clip_tokenizer(),
            text_encoder_3=tiny.t5_encoder(d_model=64, seed=3), tokenizer_3=tiny.t5_tokenizer())
