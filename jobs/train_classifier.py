"""Train the Fashion-MNIST classifier that scores class accuracy of generated samples.

    python jobs/train_classifier.py [--epochs 2] [--out assets/classifier] [--seed 0]

Writes model.safetensors + classifier.json (config, test accuracy, training time).
"""
import argparse
import platform
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from hyperscale.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from hyperscale.models.classifier import DEFAULT_DIR, TrainConfig, save_classifier, train_classifier  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    splits = [load_fashion_mnist(split).tensors() for split in ("train", "test")]
    result = train_classifier(*splits, args.epochs, train_config=TrainConfig(seed=args.seed))
    card = {"test_accuracy": result.test_accuracy, "test_images": 10000,
            "train_seconds": round(result.train_seconds, 1), "train": asdict(result.train_config),
            "history": result.history, "command": " ".join(["python"] + sys.argv),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": "(N, 1, 28, 28) float in [-1, 1]"}
    out = save_classifier(result.model, args.out, card)
    print(f"[hyperscale] classifier test accuracy {result.test_accuracy:.4f} "
          f"({result.train_seconds:.0f} s training) -> {out}")
