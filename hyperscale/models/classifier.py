"""A small Fashion-MNIST CNN used to score class-conditional samples ("class accuracy":
the fraction of generated samples it assigns to the class they were conditioned on).

Trained by ``jobs/train_classifier.py`` on the training split with a fixed seed; the
weights ship in ``assets/classifier/`` as ``model.safetensors`` next to
``classifier.json`` (its config, its measured test accuracy, how it was trained).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hyperscale.storage.local import atomic_file

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "assets" / "classifier"
WEIGHTS = "model.safetensors"
CARD = "classifier.json"
NUM_CLASSES = 10


@dataclass
class ClassifierConfig:
    """Architecture: conv-BN-ReLU stages (max-pool after the first two) and an MLP head."""
    channels: tuple[int, int, int] = (32, 64, 64)
    hidden: int = 128
    dropout: float = 0.2
    num_classes: int = NUM_CLASSES


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    max_shift: int = 1            # random translation, pixels (zero padding)
    hflip: bool = True            # Fashion-MNIST classes are mirror-symmetric
    seed: int = 0
    label_smoothing: float = 0.05


class FashionClassifier(nn.Module):
    """(N, 1, 28, 28) in [-1, 1] -> logits (N, num_classes)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        c1, c2, c3 = config.channels

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(                                       # (N, 1, 28, 28)
            *conv(1, c1), nn.MaxPool2d(2),                                   # (N, c1, 14, 14)
            *conv(c1, c2), nn.MaxPool2d(2),                                  # (N, c2, 7, 7)
            *conv(c2, c3))                                                   # (N, c3, 7, 7)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout),
            nn.Linear(c3 * 7 * 7, config.hidden), nn.ReLU(inplace=True),
            nn.Dropout(config.dropout), nn.Linear(config.hidden, config.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class TrainResult:
    model: FashionClassifier
    test_accuracy: float
    train_seconds: float
    train_config: TrainConfig
    history: list[dict] = field(default_factory=list)


def _augment(x: Tensor, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Random horizontal flip and integer shift (background = -1) per sample."""
    n = len(x)
    if cfg.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    s = cfg.max_shift
    if s > 0:
        padded = F.pad(x, (s, s, s, s), value=-1.0)
        dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
        rows = (dy.view(n, 1) + torch.arange(28)).view(n, 1, 28, 1).expand(n, 1, 28, 28 + 2 * s)
        x = padded.gather(2, rows)
        cols = (dx.view(n, 1) + torch.arange(28)).view(n, 1, 1, 28).expand(n, 1, 28, 28)
        x = x.gather(3, cols)
    return x


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """(N, 1, 28, 28) in [-1, 1] -> predicted class (N,) long. Images of another size
    are resized (bilinear) to 28x28 first."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().clamp(-1, 1)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        out.append(model(x).argmax(dim=1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def class_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``images`` (N, 1, H, W) in [-1, 1] that ``model`` assigns to ``labels`` (N,)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no images")
    pred = predict(model, images, batch_size)
    return float((pred == torch.as_tensor(labels).long()).float().mean())


def train_classifier(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], epochs: int = 2,
                     config: ClassifierConfig | None = None, train_config: TrainConfig | None = None,
                     log_every: int = 100) -> TrainResult:
    """Train on (images, labels) ``train`` (Fashion-MNIST's training split; AdamW, one-cycle LR,
    light augmentation) with a fixed seed; evaluate on ``test`` (its 10k test images)."""
    tc = train_config or TrainConfig()
    tc = TrainConfig(**{**asdict(tc), "epochs": epochs})
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    (x_train, y_train), (x_test, y_test) = train, test
    model = FashionClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = len(x_train) // tc.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.epochs * steps_per_epoch,
                                                pct_start=0.15)
    history: list[dict] = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(tc.epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for step in range(steps_per_epoch):
            idx = perm[step * tc.batch_size:(step + 1) * tc.batch_size]
            x = _augment(x_train[idx], tc, gen)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and step % log_every == 0:
                print(f"[classifier] epoch {epoch} step {step}/{steps_per_epoch} loss {loss.item():.4f} "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
        history.append({"epoch": epoch, "loss": loss.item(), "seconds": time.perf_counter() - t0})
    train_seconds = time.perf_counter() - t0
    acc = class_accuracy(model, x_test, y_test)
    model.eval()
    return TrainResult(model, acc, train_seconds, tc, history)


def save_classifier(model: FashionClassifier, directory: str | os.PathLike = DEFAULT_DIR,
                    card: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``classifier.json`` ({"config": ..., **card}, where
    the card should carry "test_accuracy") into ``directory``, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    meta = {"config": asdict(model.config), **(card or {})}
    with atomic_file(directory / CARD) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def classifier_card(directory: str | os.PathLike = DEFAULT_DIR) -> dict:
    """The JSON card saved next to the weights (config, test accuracy, training)."""
    path = Path(directory) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: train it with 'python jobs/train_classifier.py'")
    return json.loads(path.read_text())


def load_classifier(directory: str | os.PathLike = DEFAULT_DIR) -> FashionClassifier:
    """Rebuild the classifier from its card and weights; returned in eval mode."""
    card = classifier_card(directory)
    cfg = dict(card["config"])
    cfg["channels"] = tuple(cfg["channels"])
    model = FashionClassifier(ClassifierConfig(**cfg))
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS)), strict=True)
    return model.eval()
