"""Varied captions for Fashion-MNIST: the text-to-image teacher's training text and its
held-out evaluation prompts.

A caption names the item in one of several words ("sneaker", "trainer", "running shoe"), often
with its shade read off the image (grayscale: "black" ... "white", from the mean brightness of the
garment's pixels), in one of the training templates ("a photo of a {c}", "a {c} on a black
background", ...). ``HELDOUT_TEMPLATES`` are never used for training: prompt accuracy on them
measures whether the model follows the words rather than memorised sentences.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from hyperscale.data.fashion_mnist import CLASS_NAMES

# per class: the canonical class name first (the default prompt's word), then synonyms
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("t-shirt/top", "t-shirt", "tee", "top"),
    ("trouser", "pair of trousers", "pair of pants"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock", "summer dress"),
    ("coat", "jacket", "winter coat"),
    ("sandal", "strappy sandal", "summer sandal"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "short boot"),
)
# {c}: the item's word; {s}: its shade
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}",
    "a picture of a {c}",
    "a {c} on a plain background",
    "a {c}",
    "a {s} {c}",
    "a photo of a {s} {c}",
    "a {c} on a black background",
    "a {s} {c} on a black background",
    "an image of a {c}",
    "a product photo of a {s} {c}",
    "a grayscale photo of a {c}",
    "a close-up of a {s} {c}",
    "a {c}, studio shot",
    "a catalogue photo of a {c}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "there is a {c} in this picture",
    "a snapshot of a {s} {c}",
    "an illustration of a {c}",
    "a shop image showing a {s} {c}",
    "my favourite {c}",
)
SHADES = ("black", "dark grey", "grey", "light grey", "white")
_SHADE_EDGES = (40, 80, 130, 180)  # mean garment brightness (0..255) between the shades
_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def shade_of(image_u8: np.ndarray, threshold: int = 20) -> str:
    """The garment's shade: the mean brightness of its pixels (those above ``threshold``)."""
    pixels = image_u8[image_u8 > threshold]
    mean = float(pixels.mean()) if pixels.size else 0.0
    return SHADES[int(np.searchsorted(_SHADE_EDGES, mean, side="right"))]


def fill(template: str, item: str, shade: str = "") -> str:
    """The template with the item word and shade, 'a' -> 'an' before a vowel."""
    if "{c}" not in template:
        raise ValueError(f"template {template!r} has no '{{c}}' for the item")
    text = template.replace("{s}", shade).replace("{c}", item)
    return _ARTICLE.sub("an ", " ".join(text.split()))


def caption(image_u8: np.ndarray, label: int, rng: np.random.Generator,
            templates: Sequence[str] = TRAIN_TEMPLATES) -> str:
    """One random caption for an image of class ``label``: a template, a synonym, its shade."""
    template = templates[int(rng.integers(len(templates)))]
    words = SYNONYMS[int(label)]
    return fill(template, words[int(rng.integers(len(words)))], shade_of(image_u8) if "{s}" in template else "")


def template_prompts(templates: Sequence[str], per_class: int, seed: int = 0,
                     shades: Sequence[str] = SHADES) -> tuple[list[str], list[int]]:
    """``per_class`` prompts per class, label order repeated (0..9, 0..9, ...), cycling through the
    templates and each class's words (and ``shades``) deterministically from ``seed``: evaluation
    prompts with their labels."""
    rng = np.random.default_rng(seed)
    prompts, labels = [], []
    for i in range(per_class):
        for label in range(len(CLASS_NAMES)):
            words = SYNONYMS[label]
            template = templates[(i + label) % len(templates)]
            shade = shades[int(rng.integers(len(shades)))]
            prompts.append(fill(template, words[(i // len(templates)) % len(words)], shade))
            labels.append(label)
    return prompts, labels


def all_prompts(templates: Sequence[str] = TRAIN_TEMPLATES) -> list[str]:
    """Every caption the templates can make: each template with each class's every word (and every
    shade where the template has one), class by class: the prompt file of data-free distillation
    from the teacher trained on these captions."""
    out = []
    for words in SYNONYMS:
        for template in templates:
            for word in words:
                out += [fill(template, word, s) for s in (SHADES if "{s}" in template else ("",))]
    return list(dict.fromkeys(out))


def captioner(seed: int = 0, templates: Sequence[str] = TRAIN_TEMPLATES):
    """``caption_fn(image_u8, label) -> str`` for ``fashion_mnist.caption_samples``: random varied
    captions, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return lambda image_u8, label: caption(image_u8, label, rng, templates)
