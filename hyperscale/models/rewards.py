"""Reward models for feedback learning (Hyper-SD §2.3): differentiable scores of decoded images.

The interface every method sees: ``reward(x0, cond) -> (B,)`` where x0 (B, C, H, W) is the
decoded sample in [-1, 1] (for a latent model the wrapper decodes first: pass ``decode``) and
cond the class labels (B,) or prompts (a list of B strings). Gradients flow to x0; the reward
parameters are frozen (and stay in eval mode: ``train()`` is a no-op on them).

- ``ClassConsistencyReward``: log p(cond | x0) under a classifier (the project's Fashion-MNIST
  CNN, ``hyperscale.models.classifier``), the CPU-domain stand-in for ImageReward's
  "does the image match its prompt".
- ``AestheticReward``: the LAION improved aesthetic predictor, an MLP on L2-normalised CLIP
  ViT-L/14 image embeddings (head layout ``layers.{0,2,4,6,7}``, 768 -> 1024 -> 128 -> 64 -> 16 -> 1,
  no activations, as released).
- ``ImageRewardModel``: ImageReward (Xu et al. 2023): BLIP ViT-L image encoder, BLIP text
  encoder cross-attending to it, the [CLS] feature through an MLP (same layout as above,
  768 -> 1), normalised (r - 0.16717) / 1.03334; prompts tokenised to 35 tokens.

Loaders read local directories or hub ids (``huggingface_hub`` honours HF_HUB_OFFLINE) and
``build_rewards`` turns the config's reward list into a ``RewardSet``; this module does the
file I/O so that methods never do.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperscale.models.cond import Cond

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
HEAD_WEIGHTS = "head.safetensors"
IMAGE_REWARD_CARD = "image_reward.json"
AESTHETIC_CARD = "aesthetic.json"


class RewardModel(nn.Module):
    """Base: frozen, always in eval mode; ``forward(x0, cond) -> (B,)``."""

    def __init__(self, decode: nn.Module | None = None):
        super().__init__()
        self.decode = decode

    def train(self, mode: bool = True) -> "RewardModel":
        return super().train(False)

    def images(self, x0: Tensor) -> Tensor:
        return self.decode(x0) if self.decode is not None else x0

    def forward(self, x0: Tensor, cond) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class RewardSet(nn.ModuleDict):
    """Named rewards; ``forward(x0, cond) -> {name: (B,)}``."""

    def forward(self, x0: Tensor, cond) -> dict[str, Tensor]:
        return {name: r(x0, cond) for name, r in self.items()}


def _resize(x: Tensor, size: int | tuple[int, int], mode: str = "bicubic") -> Tensor:
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=mode in ("bilinear", "bicubic"))


def clip_preprocess(x: Tensor, size: int = 224) -> Tensor:
    """[-1, 1] images (B, 1|3, H, W) -> CLIP input: RGB, shortest side resized to ``size``
    (bicubic), centre crop, CLIP mean/std; differentiable (no clamping)."""
    x = (x + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = _resize(x, (max(size, round(h * scale)), max(size, round(w * scale))))
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _labels(cond, n: int) -> Tensor:
    if isinstance(cond, Cond):
        cond = cond.labels
    if not isinstance(cond, Tensor) or cond.dtype not in (torch.int64, torch.int32):
        raise TypeError("class-consistency reward needs integer class labels as cond")
    if cond.shape != (n,):
        raise ValueError(f"cond of shape {tuple(cond.shape)} for {n} images")
    return cond.long()


class ClassConsistencyReward(RewardModel):
    """log p(cond | x0) (``log_prob``, <= 0) or p(cond | x0) (``prob``) under ``classifier``
    (images (B, C, S, S) in [-1, 1] -> logits (B, K)); x0 is resized to ``input_size``.
    Labels outside [0, K) (e.g. the CFG null class) are an error."""

    def __init__(self, classifier: nn.Module, kind: str = "log_prob", input_size: int | None = 28,
                 decode: nn.Module | None = None):
        super().__init__(decode)
        if kind not in ("log_prob", "prob"):
            raise ValueError(f"kind must be log_prob or prob, got {kind!r}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.kind, self.input_size = kind, input_size

    def forward(self, x0: Tensor, cond) -> Tensor:
        x = self.images(x0)
        if self.input_size is not None:
            x = _resize(x, self.input_size, "bilinear")
        logits = self.classifier(x).float()
        y = _labels(cond, x.shape[0]).to(logits.device)
        if (y < 0).any() or (y >= logits.shape[1]).any():
            raise ValueError("class-consistency reward: labels must be real classes")
        logp = logits.log_softmax(1).gather(1, y[:, None])[:, 0]
        return logp if self.kind == "log_prob" else logp.exp()


def mlp_head(input_size: int = 768) -> nn.Sequential:
    """The LAION improved-aesthetic-predictor / ImageReward MLP: Linear layers 1024, 128, 64, 16, 1
    with dropout between the first four (state-dict keys layers.0/2/4/6/7), no activations."""
    return nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class _Head(nn.Module):
    def __init__(self, input_size: int):
        super().__init__()
        self.layers = mlp_head(input_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AestheticReward(RewardModel):
    """LAION aesthetic score: head(normalise(CLIP image embedding)) (B,); ``clip`` is a
    transformers ``CLIPVisionModelWithProjection``."""

    def __init__(self, clip: nn.Module, head: nn.Module, image_size: int = 224, decode: nn.Module | None = None):
        super().__init__(decode)
        self.clip = clip.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.image_size = image_size

    def forward(self, x0: Tensor, cond=None) -> Tensor:
        pixels = clip_preprocess(self.images(x0), self.image_size)
        emb = self.clip(pixel_values=pixels.to(next(self.clip.parameters()).dtype)).image_embeds.float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.head(emb)[:, 0]


def prompts_for(cond, class_names: Sequence[str] | None, template: str = "{}") -> list[str]:
    """Prompts (list of B strings) from cond: strings pass through; labels map through class_names."""
    if isinstance(cond, (list, tuple)) and all(isinstance(c, str) for c in cond):
        return list(cond)
    if class_names is None:
        raise ValueError("label conditioning needs class_names to build prompts")
    labels = cond.labels if isinstance(cond, Cond) else torch.as_tensor(cond)
    return [template.format(class_names[int(i)]) for i in labels.tolist()]


class ImageRewardModel(RewardModel):
    """ImageReward on transformers BLIP parts: ``vision`` (BlipVisionModel), ``text`` (BlipTextModel
    with cross-attention), ``head`` (the MLP), ``tokenizer`` (BERT, max_length tokens)."""

    def __init__(self, vision: nn.Module, text: nn.Module, head: nn.Module, tokenizer: Callable,
                 class_names: Sequence[str] | None = None, template: str = "{}", image_size: int = 224,
                 max_length: int = 35, mean: float = IMAGE_REWARD_MEAN, std: float = IMAGE_REWARD_STD,
                 decode: nn.Module | None = None):
        super().__init__(decode)
        self.vision = vision.eval().requires_grad_(False)
        self.text = text.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.tokenizer, self.class_names, self.template = tokenizer, class_names, template
        self.image_size, self.max_length, self.mean, self.std = image_size, max_length, mean, std

    def forward(self, x0: Tensor, cond) -> Tensor:
        pixels = clip_preprocess(self.images(x0), self.image_size)
        dtype = next(self.vision.parameters()).dtype
        image_embeds = self.vision(pixel_values=pixels.to(dtype))[0]
        tok = self.tokenizer(prompts_for(cond, self.class_names, self.template), padding="max_length",
                             truncation=True, max_length=self.max_length, return_tensors="pt")
        dev = image_embeds.device
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=dev)
        out = self.text(input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev),
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        feats = out[0][:, 0, :].float()
        return ((self.head(feats) - self.mean) / self.std)[:, 0]


# ---------------------------------------------------------------- loaders (file I/O)

def _local(source: str | os.PathLike) -> Path:
    """A local directory or file, or a hub id (owner/name) downloaded through huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source).startswith((".", "/")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"reward model source '{source}' is neither a local path nor a hub id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source)))


def _load_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _head_from(path: Path) -> _Head:
    state = _load_state(path)
    state = {k[len("layers."):] if k.startswith("layers.") else k: v for k, v in state.items()}
    head = _Head(int(state["0.weight"].shape[1]))
    head.layers.load_state_dict(state)
    return head.eval()


def load_aesthetic(source: str | os.PathLike, head: str | os.PathLike | None = None) -> AestheticReward:
    """The LAION aesthetic predictor from a directory holding ``clip/`` (a transformers
    CLIPVisionModelWithProjection, e.g. openai/clip-vit-large-patch14) and ``head.safetensors``
    (or a released ``*.pth`` given as ``head``: keys layers.0/2/4/6/7). ``source`` may also be
    the CLIP model itself (local or hub id) when ``head`` is given."""
    from transformers import CLIPVisionModelWithProjection

    root = _local(source)
    clip_dir = root / "clip" if (root / "clip").is_dir() else root
    head_path = Path(head) if head is not None else root / HEAD_WEIGHTS
    if not head_path.is_file():
        raise FileNotFoundError(f"aesthetic head weights not found: {head_path}")
    card = json.loads((root / AESTHETIC_CARD).read_text()) if (root / AESTHETIC_CARD).is_file() else {}
    clip = CLIPVisionModelWithProjection.from_pretrained(str(clip_dir))
    return AestheticReward(clip, _head_from(head_path), int(card.get("image_size", clip.config.image_size)))


def load_image_reward(source: str | os.PathLike, class_names: Sequence[str] | None = None,
                      template: str = "{}") -> ImageRewardModel:
    """ImageReward from a directory in transformers layout: ``blip/`` (BlipForImageTextRetrieval
    save_pretrained: its vision_model and text_encoder are used), ``tokenizer/`` (BERT),
    ``head.safetensors`` (the MLP, keys layers.0/2/4/6/7) and optional ``image_reward.json``
    ({"mean", "std", "max_length", "image_size"}). The official ``ImageReward.pt`` keys (BLIP's
    original module names) must be converted to this layout first."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    root = _local(source)
    card = json.loads((root / IMAGE_REWARD_CARD).read_text()) if (root / IMAGE_REWARD_CARD).is_file() else {}
    blip = BlipForImageTextRetrieval.from_pretrained(str(root / "blip"))
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    return ImageRewardModel(blip.vision_model, blip.text_encoder, _head_from(root / HEAD_WEIGHTS), tokenizer,
                            class_names, template, int(card.get("image_size", blip.config.vision_config.image_size)),
                            int(card.get("max_length", 35)), float(card.get("mean", IMAGE_REWARD_MEAN)),
                            float(card.get("std", IMAGE_REWARD_STD)))


def save_reward_head(head: nn.Module, directory: str | os.PathLike, card: dict | None = None,
                     card_name: str = IMAGE_REWARD_CARD) -> Path:
    """Write ``head.safetensors`` (keys layers.*) [+ a JSON card] into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(directory / HEAD_WEIGHTS))
    if card is not None:
        (directory / card_name).write_text(json.dumps(card, indent=1))
    return directory


def build_reward(spec, class_names: Sequence[str] | None = None) -> RewardModel:
    """One reward from a config entry with ``kind`` and ``source`` (and optional ``head``,
    ``template``): class_consistency (source: a classifier directory, default the shipped
    assets/classifier), aesthetic, image_reward."""
    kind, source = spec.kind, getattr(spec, "source", None)
    if kind == "class_consistency":
        from hyperscale.models.classifier import DEFAULT_DIR, load_classifier

        return ClassConsistencyReward(load_classifier(source or DEFAULT_DIR))
    if source is None:
        raise ValueError(f"reward '{spec.name}' ({kind}) needs a source (local path or hub id)")
    if kind == "aesthetic":
        return load_aesthetic(source, getattr(spec, "head", None))
    if kind == "image_reward":
        return load_image_reward(source, class_names, getattr(spec, "template", None) or "{}")
    raise ValueError(f"unknown reward kind {kind!r}")


def build_rewards(specs: Sequence, class_names: Sequence[str] | None = None) -> RewardSet:
    """The frozen ``reward`` role: a RewardSet with one entry per config reward (by name)."""
    return RewardSet({s.name: build_reward(s, class_names) for s in specs}).eval().requires_grad_(False)
