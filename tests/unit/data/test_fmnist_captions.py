import numpy as np
import pytest

from hyperscale.data.fashion_mnist import CLASS_NAMES, ImageSet, caption_samples
from hyperscale.data.fmnist_captions import (HELDOUT_TEMPLATES, all_prompts, SHADES, SYNONYMS, TRAIN_TEMPLATES, captioner, fill,
                                             shade_of, template_prompts)


def test_words_and_templates():
    assert [words[0] for words in SYNONYMS] == list(CLASS_NAMES)
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    # no item word is another class's word
    words = [w for ws in SYNONYMS for w in ws]
    assert len(words) == len(set(words))


def test_fill():
    assert fill("a photo of a {c}", "ankle boot") == "a photo of an ankle boot"
    assert fill("a {s} {c}", "coat", "") == "a coat"
    assert fill("a {s} {c} on a black background", "bag", "light grey") == "a light grey bag on a black background"
    with pytest.raises(ValueError, match="no '{c}'"):
        fill("a photo", "bag")


def test_shade_of():
    img = np.zeros((28, 28), np.uint8)
    assert shade_of(img) == "black"  # no garment pixels
    for value, shade in ((30, "black"), (60, "dark grey"), (100, "grey"), (150, "light grey"), (240, "white")):
        img[5:20, 5:20] = value
        assert shade_of(img) == shade


def test_captioner_is_reproducible_and_names_the_class():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (50, 28, 28), dtype=np.uint8)
    labels = np.arange(50) % 10

    def captions(seed):
        fn = captioner(seed)
        return [fn(im, int(y)) for im, y in zip(images, labels)]

    first = captions(7)
    assert first == captions(7) and first != captions(8)
    assert len(set(first)) > 25  # varied, not one sentence per class
    for text, y in zip(first, labels):
        assert any(w in text for w in SYNONYMS[y]), text
    samples = list(caption_samples(ImageSet(images, labels), channels=1, caption_fn=captioner(7), repeat=2))
    assert len(samples) == 100 and samples[0]["image"].shape == (32, 32)
    assert [s["caption"] for s in samples[:50]] == first
    assert [s["meta"]["label"] for s in samples] == list(labels) * 2


def test_template_prompts():
    prompts, labels = template_prompts(HELDOUT_TEMPLATES, per_class=12, seed=0)
    assert len(prompts) == 120 and labels == list(range(10)) * 12
    heads = [t.split("{")[0][:8] for t in HELDOUT_TEMPLATES]
    for p, y in zip(prompts, labels):
        assert any(p.startswith(h) for h in heads), p  # held-out sentences only
        assert any(w in p for w in SYNONYMS[y])
    assert any(s in " ".join(prompts) for s in SHADES)
    assert template_prompts(HELDOUT_TEMPLATES, 12, seed=0) == (prompts, labels)


def test_all_prompts_cover_every_training_caption():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) > 1000
    fn = captioner(3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        label = int(rng.integers(10))
        assert fn(rng.integers(0, 255, (28, 28), dtype=np.uint8), label) in prompts
    assert not any(p.startswith("there is a") for p in prompts)  # held-out templates stay out
