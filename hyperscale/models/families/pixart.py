"""Family ``pixart``: PixArt-alpha / PixArt-Sigma, a DiT (``PixArtTransformer2DModel``) on VP latents.

Pipelines: ``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline`` (one T5 text encoder; the
transformer reads its hidden states through a caption projection and masks the padding with the
tokenizer's attention mask). What the pipelines do and this family mirrors (diffusers 0.42.1):

- **Cond**: ``embeds`` (B, L, D) T5 states and ``mask`` (B, L) the attention mask, from the
  pipeline's ``encode_prompt`` with ``clean_caption=False`` (its cleaner needs bs4/ftfy and would
  make the condition depend on the machine) and ``max_sequence_length`` = the smaller of the
  tokenizer's ``model_max_length`` and the pipeline's own default (120 for alpha, 300 for
  Sigma), so an export called with the pipeline's defaults sees the prompts as training did.
  Call an export with ``clean_caption=False`` (and the same ``max_sequence_length`` where the
  tokenizer is shorter than the default, e.g. 16 for ``tiny:pixart``). The null condition is the
  pipeline's negative embedding for "" (padded to the same length, mask included).
- **Micro-conditions**: the alpha pipeline passes ``resolution`` / ``aspect_ratio`` only when
  the transformer's ``sample_size`` is 128 (PixArt-alpha 1024 px): then ``Cond.extra`` carries
  the default square image size (the pipeline's default height / width); otherwise, and always
  for Sigma, they are None, as the pipelines pass.
- **Learned sigma**: when ``out_channels`` is twice the latent channels, the first half is the
  eps prediction and the variance half is dropped, as the pipelines do.
- **Schedule**: VP betas from the scheduler config (DPM-Solver++ in the released checkpoints;
  the DDPM keys are read as for SD, ``TextToImageFamily.schedule_of``), eps prediction.

Resolution binning (``use_resolution_binning``) only applies to the released 256/512/1024/2048
sizes; call a tiny export with ``use_resolution_binning=False``.

**LoRA**: diffusers 0.42.1 has no LoRA loader for PixArt (``PixArtAlphaPipeline`` /
``PixArtSigmaPipeline`` have no ``load_lora_weights``, the transformer no ``load_lora_adapter``).
LoRA layers go on the transformer through peft (``models/lora.py``, key prefix ``transformer``;
targets e.g. to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2), and ``save_student`` writes
the **merged** transformer into the pipeline folder: that folder is the diffusers-loadable form.
``lora/pytorch_lora_weights.safetensors`` loads back with our ``load_lora`` (peft), and the kohya
file is for other tools.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from hyperscale.models.cond import Cond
from hyperscale.models.families import tiny
from hyperscale.models.families.text2image import TextToImageFamily, inner
from hyperscale.models.family import feature_hooks

MICRO_CONDITION_SIZE = 128  # the alpha pipeline passes resolution / aspect ratio at this sample_size only
FEATURE_LEVELS = 4  # transformer blocks tapped for the adversarial head, evenly spread over the depth


def max_sequence_length(pipe) -> int:
    """Prompt length in tokens: the tokenizer's limit, capped at the pipeline's default."""
    default = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    return min(int(pipe.tokenizer.model_max_length), int(default))


class PixArt(TextToImageFamily):
    name = "pixart"
    backbone_name = "transformer"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")

    # ---------------------------------------------------------------- conditions
    def _micro(self, pipe, n: int, device) -> dict[str, Tensor]:
        """The alpha pipeline's resolution / aspect-ratio inputs at the default square size ({} if none)."""
        if type(pipe).__name__ != "PixArtAlphaPipeline" or pipe.frontend_sample_size != MICRO_CONDITION_SIZE:
            return {}
        side = float(pipe.frontend_sample_size * pipe.vae_scale_factor)
        return {"resolution": torch.tensor([[side, side]], device=device).repeat(n, 1),
                "aspect_ratio": torch.ones(n, 1, device=device)}

    def _encode(self, pipe, prompts: list[str], device, negative: bool) -> Cond:
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=negative, negative_prompt="", device=device,
            clean_caption=False, max_sequence_length=max_sequence_length(pipe))
        if negative:
            embeds, mask = neg_embeds, neg_mask
        return Cond(embeds=embeds, mask=mask, extra=self._micro(pipe, len(prompts), embeds.device))

    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        return self._encode(pipe, prompts, device, negative=False)

    def null_prompt(self, pipe, device) -> Cond:
        return self._encode(pipe, [""], device, negative=True)

    def call(self, net: nn.Module, x_t: Tensor, model_t: Tensor, cond: Cond) -> Tensor:
        added = {"resolution": cond.extra.get("resolution"), "aspect_ratio": cond.extra.get("aspect_ratio")}
        out = net(x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=model_t,
                  added_cond_kwargs=added).sample
        if net.config.out_channels // 2 == net.config.in_channels:  # learned sigma: keep the eps half
            out = out.chunk(2, dim=1)[0]
        return out

    # ---------------------------------------------------------------- adversarial taps
    def _taps(self, net: nn.Module) -> list[nn.Module]:
        blocks = list(net.transformer_blocks)
        n = min(FEATURE_LEVELS, len(blocks))
        return [blocks[(i + 1) * len(blocks) // n - 1] for i in range(n)]

    def feature_channels(self, denoiser: nn.Module) -> list[int]:
        net = inner(denoiser).net
        return [net.config.num_attention_heads * net.config.attention_head_dim] * len(self._taps(net))

    def features(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond) -> list[Tensor]:
        """Token states (B, N, D) after evenly spread transformer blocks, as (B, D, H/p, W/p) maps."""
        net = inner(denoiser).net
        taps = self._taps(net)
        feats = feature_hooks(lambda: denoiser(x_t, t, cond), taps[:-1], taps[-1])
        h, w = (s // net.config.patch_size for s in x_t.shape[-2:])
        return [f.transpose(1, 2).reshape(f.shape[0], f.shape[2], h, w) for f in feats]

    # ---------------------------------------------------------------- tiny test pipeline
    def tiny_pipeline(self):
        from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

        encoder = tiny.t5_encoder()
        torch.manual_seed(0)
        # 8 x 8 x 4 latents in 2 x 2 patches; learned sigma (8 = 2 x 4 output channels) as the real model
        net = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                       num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                       norm_type="ada_norm_single", caption_channels=encoder.config.d_model)
        # PixArt-alpha's released scheduler: DPM-Solver++ on the linear betas
        scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                                prediction_type="epsilon")
        return PixArtAlphaPipeline(tokenizer=tiny.t5_tokenizer(), text_encoder=encoder, vae=tiny.vae(),
                                   transformer=net.eval(), scheduler=scheduler)
