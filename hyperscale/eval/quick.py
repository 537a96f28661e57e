"""A quick in-loop quality evaluation: FID, KID, precision/recall and class accuracy of a
generator on a small fixed sample set, for sweeps that stop poor trials early
(``hyperscale.tune``).

The same feature network, reference statistics (the Fashion-MNIST test set) and classifier
as the quality benchmark (``hyperscale.bench.quality``), on fewer samples (default 500, class
balanced, fixed noise). FID on few samples is biased upwards (Chong & Forsyth 2020): values
compare trials of one sweep, not the benchmark's 2,000-sample table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from hyperscale.eval.metrics import KID_SUBSET_SIZE, evaluate_samples

SampleFn = Callable[[Tensor, object], Tensor]  # (noise, Cond) -> what the generator makes (pixels or latents)


@dataclass
class QuickEval:
    """``QuickEval(...)(sample_fn, step, model)`` -> {"eval/fid", "eval/kid", "eval/precision",
    "eval/recall", "eval/class_acc"}. ``model`` (the generator) tells the family: class labels
    for a class-conditional one; for a text-to-image one the class prompts "a photo of a
    {class}", latents decoded and cropped to 28 x 28 grayscale as the quality suite does
    (docs/families/fmnist.md). Picklable (Ray ships it to trials); the networks load on first
    use in the trial."""
    num_samples: int = 500
    seed: int = 0
    batch_size: int = 250
    image_size: int = 64
    reference_limit: int | None = None  # None: all 10k test images (tests use fewer)

    def __post_init__(self) -> None:
        if self.num_samples < 10 or self.num_samples % 10:
            raise ValueError(f"eval num_samples must be a positive multiple of 10 (class balanced), "
                             f"got {self.num_samples}")
        self._state = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_state"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _state=None)

    def settings(self) -> dict:
        return asdict(self)

    def prepare(self) -> "QuickEval":
        """Load the feature network, the reference statistics (computed once, then cached on
        disk) and the classifier. Call once in the driver so trials find the cache warm."""
        if self._state is None:
            from hyperscale.models.classifier import load_classifier
            from hyperscale.eval.features import FeatureExtractor, reference_stats

            extractor = FeatureExtractor(image_size=self.image_size)
            ref = reference_stats(extractor, limit=self.reference_limit)
            self._state = (extractor, ref, load_classifier(), torch.arange(self.num_samples) % 10)
        return self

    def noise(self, shape: tuple[int, ...]) -> Tensor:
        """The fixed noise for samples of ``shape`` (the same draw at every evaluation)."""
        return torch.randn((self.num_samples, *shape), generator=torch.Generator().manual_seed(self.seed))

    @torch.no_grad()
    def __call__(self, sample: SampleFn, step: int, model) -> dict:
        from hyperscale.data.fashion_mnist import class_prompts
        from hyperscale.models.autoencoder import to_gray28
        from hyperscale.models.families import family_of

        extractor, ref, classifier, labels = self.prepare()._state
        family = family_of(model)
        text = family.condition == "text"
        prompts = class_prompts() if text else None  # "a photo of a {class}", label order
        items = [prompts[int(i)] for i in labels] if text else labels
        noise = self.noise(tuple(family.sample_shape(model)))
        out = []
        for i in range(0, self.num_samples, self.batch_size):
            x = sample(noise[i:i + self.batch_size], family.encode_condition(model, items[i:i + self.batch_size]))
            x = family.decode(model, x).float().cpu()
            out.append(to_gray28(x) if text else x.clamp(-1, 1))
        m = evaluate_samples(torch.cat(out), labels, ref, extractor, classifier,
                             kid_subset_size=min(KID_SUBSET_SIZE, self.num_samples, len(ref.features)))
        return {f"eval/{k}": float(v) for k, v in m.items()}
