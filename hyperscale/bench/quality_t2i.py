"""The quality suite for a Fashion-MNIST text-to-image teacher (docs/benchmarks.md §2.6).

Same protocol as the pixel suite (fixed noise, class-balanced, FID/KID/precision/recall on
EfficientNet-Lite0 features against the 10k test images, the project's classifier): every
generator row is prompted with the class prompt "a photo of a {class}" (a training template),
samples are decoded by the pipeline's VAE, clamped, cropped back from 32 x 32 to 28 x 28 and made
grayscale. ``class_acc`` is then the prompt accuracy on the training template; ``heldout_acc``
scores the same generator on prompts from the held-out templates (hyperscale/data/fmnist_captions.py:
other sentences, synonyms, shades) that no training caption used. The VAE-reconstruction row
(the real-data images through the VAE) is the floor every latent generator is bounded by.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from hyperscale.data.fashion_mnist import class_prompts
from hyperscale.data.fmnist_captions import HELDOUT_TEMPLATES, template_prompts
from hyperscale.models.autoencoder import to_gray28
from hyperscale.models.classifier import class_accuracy
from hyperscale.models.families import family_of

PromptSampler = Callable[[Tensor, object], Tensor]  # (latent noise, encoded prompts) -> latents
EVAL_PROMPTS = tuple(class_prompts())  # "a photo of a {class}", label order
HELDOUT_PER_CLASS = 50
HELDOUT_SEED = 1


class TextRows:
    """Turns latent samplers into the suite's ``SampleFn`` (noise, labels) -> images and scores
    held-out prompt accuracy; one per teacher (its frontend encodes every row's prompts)."""

    def __init__(self, teacher, seed: int):
        self.teacher, self.family = teacher, family_of(teacher)
        self.shape = tuple(self.family.sample_shape(teacher))
        self.heldout, labels = template_prompts(HELDOUT_TEMPLATES, HELDOUT_PER_CLASS, seed=HELDOUT_SEED)
        self.heldout_labels = torch.tensor(labels)
        self.heldout_noise = torch.randn((len(labels), *self.shape), generator=torch.Generator().manual_seed(seed + 7))

    def describe(self) -> dict:
        """What the record's settings say about the prompts (each grid row is one class's prompt)."""
        return {"prompts": list(EVAL_PROMPTS), "heldout_templates": list(HELDOUT_TEMPLATES),
                "heldout_samples": len(self.heldout), "heldout_seed": HELDOUT_SEED,
                "images": "decoded by the pipeline's VAE, clamped, 32x32 cropped to 28x28, grayscale"}

    def decode(self, latents: Tensor) -> Tensor:
        with torch.no_grad():
            return to_gray28(self.family.decode(self.teacher, latents))

    def images(self, fn: PromptSampler, noise: Tensor, prompts: list[str]) -> Tensor:
        cond = self.family.encode_condition(self.teacher, prompts)
        return self.decode(fn(noise, cond))

    def sample_fn(self, fn: PromptSampler):
        """The suite's SampleFn: labels become their class prompts."""
        return lambda z, y: self.images(fn, z, [EVAL_PROMPTS[int(i)] for i in y])

    @torch.no_grad()
    def heldout_accuracy(self, fn: PromptSampler, classifier, batch_size: int) -> float:
        out = [self.images(fn, self.heldout_noise[i:i + batch_size], self.heldout[i:i + batch_size])
               for i in range(0, len(self.heldout), batch_size)]
        return class_accuracy(classifier, torch.cat(out), self.heldout_labels)

    @torch.no_grad()
    def reconstruct(self, images28: Tensor, batch_size: int = 250) -> Tensor:
        """Real images (B, 1, 28, 28) -> padded to the VAE's side, encoded (posterior mode), decoded, cropped."""
        side = self.family.image_side(self.teacher)
        pad = (side - 28) // 2
        vae = self.teacher.frontend.vae
        out = []
        for i in range(0, len(images28), batch_size):
            x = torch.nn.functional.pad(images28[i:i + batch_size], (pad, side - 28 - pad) * 2, value=-1.0)
            x = x.expand(-1, vae.config.in_channels, -1, -1)
            out.append(to_gray28(vae.decode(vae.encode(x).latent_dist.mode()).sample))
        return torch.cat(out)
