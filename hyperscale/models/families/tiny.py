"""Tiny text-to-image pipelines built from config, offline: the same diffusers classes and code
paths as SD1.5 / SDXL / PixArt-alpha / SD3 / FLUX, at a size that trains in seconds on a CPU.

They serve the test suite and the ``*-tiny`` presets (``model.pretrained_teacher_model:
tiny:<family>``, resolved by ``hyperscale.models.build.resolve_source``): a deterministic
random pipeline (seed 0) saved once into the cache as a diffusers folder and then loaded like
any checkpoint. Weights are random, so their images are noise; what they check is plumbing.

Tokenizers: no hub is reachable, so the CLIP tokenizer gets a small byte-level BPE vocabulary
(every byte, plus whole-word merges for the caption words below; unknown words fall back to
bytes) and T5 a small Unigram vocabulary (``T5Tokenizer(vocab=[(piece, score)])``, no
sentencepiece). Real checkpoints ship their own tokenizer files.
"""
from __future__ import annotations

from functools import lru_cache

import torch

# caption words: the Fashion-MNIST prompts ("a photo of a {class}") and a few templates
WORDS = ("a photo of picture an on plain background there is in this the t-shirt/top t-shirt top trouser "
         "pullover dress coat sandal shirt sneaker bag ankle boot sketch drawing black white red blue "
         "green small large close-up").split()

CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    base = list(_bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    merges: list[str] = []
    for word in sorted({w for w in WORDS if w.isascii()}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: each prefix becomes a token
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    merges = list(dict.fromkeys(merges))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=CLIP_MAX_LENGTH)


def clip_text_encoder(hidden: int = 32, projection: bool = False, seed: int = 0):
    """A 2-layer CLIP text encoder on the tiny vocabulary; ``projection``: with a text projection
    (SDXL's second encoder, SD3's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = _clip_vocab()
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=CLIP_MAX_LENGTH,
                            projection_dim=hidden, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_tokenizer():
    from transformers import T5Tokenizer

    chars = sorted({c for w in WORDS for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    vocab += [("\u2581" + w, -2.0) for w in sorted(set(WORDS))]  # whole words preferred
    vocab += [(c, -8.0) for c in chars] + [("\u2581" + c, -8.0) for c in chars]
    vocab = list({p: (p, s) for p, s in vocab}.values())
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def t5_encoder(d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def vae(quant_convs: bool = True, seed: int = 0, **config):
    """AutoencoderKL, 32 x 32 x 3 -> 8 x 8 x 4 (three block entries: a scale factor of 4)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
              down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
              latent_channels=4, norm_num_groups=4, sample_size=32,
              use_quant_conv=quant_convs, use_post_quant_conv=quant_convs) | config
    return AutoencoderKL(**kw).eval()
