"""Train the Fashion-MNIST VAE of the latent text-to-image teacher (32 x 32 x 1 -> 8 x 8 x 4).

    python jobs/train_vae.py [--out runs/fmnist-t2i/vae] [--work-dir runs/fmnist-t2i/vae-train] [--steps 5000]

Resumable: run the same command again after a stop. Writes a diffusers ``AutoencoderKL`` folder
(``from_pretrained``) with ``training.json`` (config, history, test MSE / PSNR).
"""
import argparse
import dataclasses
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from hyperscale.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from hyperscale.models.autoencoder import VAEConfig, pad32, reconstruct, save_vae, train_vae  # noqa: E402
from hyperscale.models.classifier import load_classifier  # noqa: E402
from hyperscale.storage.records import machine  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/fmnist-t2i/vae"))
    ap.add_argument("--work-dir", type=Path, default=Path("runs/fmnist-t2i/vae-train"))
    ap.add_argument("--steps", type=int, default=VAEConfig.steps)
    ap.add_argument("--channels", default="32,64,64", help="block_out_channels, comma separated (three entries)")
    ap.add_argument("--perceptual-weight", type=float, default=VAEConfig.perceptual_weight)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 beside other work")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = VAEConfig(block_out_channels=tuple(int(c) for c in args.channels.split(",")), steps=args.steps,
                       perceptual_weight=args.perceptual_weight, seed=args.seed)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    vae, state = train_vae(train.images, test.images, config, args.work_dir, classifier=load_classifier())
    x_test = pad32(test.images)
    mse = float((reconstruct(vae, x_test) - x_test).pow(2).mean())
    card = {"config": dataclasses.asdict(config), "params": sum(p.numel() for p in vae.parameters()),
            "test_mse": mse, "test_psnr_db": 10 * math.log10(4 / mse), "train_seconds": round(state.seconds, 1),
            "history": state.history, "command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": "Fashion-MNIST train, padded 28 -> 32 with black; test MSE on all 10k test images"}
    out = save_vae(vae, args.out, pad32(train.images[:5000]), card)
    print(f"[hyperscale] VAE test MSE {mse:.5f} (PSNR {card['test_psnr_db']:.2f} dB), "
          f"{state.seconds / 60:.1f} min training -> {out}")
