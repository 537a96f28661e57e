"""The latent text-to-image teacher's VAE: a diffusers ``AutoencoderKL`` trained here on
Fashion-MNIST padded to 32 x 32 (grayscale, black border), latents 8 x 8 x 4.

Loss: pixel MSE + L1, a perceptual term on the project's classifier's conv features (the
reconstructions must keep what tells classes and textures apart, not only the mean) and a small
KL term (an almost deterministic posterior, as SD's f8 VAE). Trained by ``jobs/train_vae.py``,
resumable from its checkpoint; the result is ``save_pretrained`` with the ``scaling_factor``
that gives the training latents unit variance. docs/families/fmnist.md has the figures.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperscale.storage.local import atomic_dir, atomic_file

CHECKPOINT = "vae-train.pt"


@dataclass
class VAEConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # three entries: 32 -> 8 (scale factor 4)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    lr_min_ratio: float = 0.05
    warmup: int = 100
    kl_weight: float = 1e-6
    l1_weight: float = 0.5
    perceptual_weight: float = 0.5
    hflip: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50


def pad32(images_u8: np.ndarray | Tensor) -> Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) in [-1, 1], black (-1) border of 2 pixels."""
    x = torch.as_tensor(np.array(images_u8)).float().div(127.5).sub(1).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


def crop28(x: Tensor) -> Tensor:
    """(N, C, H, W), H and W >= 28 -> the 28 x 28 centre (the padding back off)."""
    top, left = (x.shape[-2] - 28) // 2, (x.shape[-1] - 28) // 2
    return x[..., top:top + 28, left:left + 28]


def to_gray28(images: Tensor) -> Tensor:
    """Decoded images (B, C, 32, 32) in [-1, 1] -> (B, 1, 28, 28) as the pixel data: clamped,
    the padding cropped off, channels averaged. How every evaluation sees a latent sample."""
    return crop28(images.clamp(-1, 1)).mean(1, keepdim=True)


def build_vae(config: VAEConfig) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(config.seed)
    n = len(config.block_out_channels)
    return AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=tuple(config.block_out_channels),
                         layers_per_block=config.layers_per_block, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, latent_channels=config.latent_channels,
                         norm_num_groups=config.norm_num_groups, sample_size=32)


class PerceptualLoss(nn.Module):
    """Mean squared difference of the frozen classifier's conv-stage activations, each stage
    normalised by its channel count (a Fashion-MNIST stand-in for LPIPS, which has no offline weights)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList()
        current: list[nn.Module] = []
        for layer in classifier.features:
            current.append(layer)
            if isinstance(layer, nn.ReLU):
                self.stages.append(nn.Sequential(*current))
                current = []
        self.requires_grad_(False).eval()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        loss = a.new_zeros(a.shape[0])
        for stage in self.stages:
            a, b = stage(a), stage(b)
            loss = loss + (a - b).pow(2).flatten(1).mean(1)
        return loss


def lr_at(step: int, c: VAEConfig) -> float:
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    p = min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))
    return c.lr * (c.lr_min_ratio + (1 - c.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def vae_losses(vae, x: Tensor, perceptual: PerceptualLoss | None, c: VAEConfig,
               generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    mse = (recon - x).pow(2).flatten(1).mean(1)
    l1 = (recon - x).abs().flatten(1).mean(1)
    kl = posterior.kl()  # (B,): summed over the latent's dimensions
    loss = mse + c.l1_weight * l1 + c.kl_weight * kl
    parts = {"mse": mse.mean().item(), "l1": l1.mean().item(), "kl": kl.mean().item()}
    if perceptual is not None and c.perceptual_weight > 0:
        p = perceptual(crop28(recon), crop28(x))
        loss = loss + c.perceptual_weight * p
        parts["perceptual"] = p.mean().item()
    return loss.mean(), parts


@torch.no_grad()
def reconstruct(vae, x: Tensor, batch_size: int = 250) -> Tensor:
    """Posterior-mode reconstructions in [-1, 1] (clamped), as the pipelines decode a latent."""
    out = [vae.decode(vae.encode(x[i:i + batch_size]).latent_dist.mode()).sample.clamp(-1, 1)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def latent_std(vae, x: Tensor, batch_size: int = 250) -> float:
    z = torch.cat([vae.encode(x[i:i + batch_size]).latent_dist.sample() for i in range(0, len(x), batch_size)])
    return float(z.std())


@dataclass
class VAEState:
    step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def train_vae(train_u8: np.ndarray, test_u8: np.ndarray, config: VAEConfig, work_dir: Path,
              classifier: nn.Module | None = None, log: Callable[[str], None] = print,
              until: int | None = None) -> tuple[nn.Module, VAEState]:
    """Train (or resume from ``work_dir/vae-train.pt``) to ``config.steps`` (or stop at ``until``);
    checkpoints atomically every ``checkpoint_every`` steps and at the stop."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    vae = build_vae(config).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    state = VAEState()
    ckpt = work_dir / CHECKPOINT
    g = torch.Generator().manual_seed(config.seed)
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved["config"] != asdict(config) | {"steps": saved["config"]["steps"]}:
            raise ValueError(f"{ckpt} was written with another VAE config; use a new --work-dir or the same settings")
        vae.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = VAEState(**saved["state"])
        g.set_state(saved["generator"])
        log(f"[hyperscale] resumed VAE training at step {state.step}")
    perceptual = PerceptualLoss(classifier) if classifier is not None else None
    x_train = pad32(train_u8)
    x_test = pad32(test_u8[:1000])

    def save() -> None:
        with atomic_file(ckpt) as tmp:
            torch.save({"model": vae.state_dict(), "optimizer": opt.state_dict(), "state": asdict(state),
                        "config": asdict(config), "generator": g.get_state()}, tmp)

    t0, since = time.perf_counter(), state.seconds
    stop = min(config.steps, until or config.steps)
    while state.step < stop:
        idx = torch.randint(0, len(x_train), (config.batch_size,), generator=g)
        x = x_train[idx]
        if config.hflip:
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        for group in opt.param_groups:
            group["lr"] = lr_at(state.step, config)
        loss, parts = vae_losses(vae, x, perceptual, config, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        state.step += 1
        state.seconds = since + time.perf_counter() - t0
        if state.step % config.log_every == 0 or state.step == config.steps:
            vae.eval()
            test_mse = float((reconstruct(vae, x_test) - x_test).pow(2).mean())
            vae.train()
            row = {"step": state.step, "loss": round(loss.item(), 5), "test_mse": round(test_mse, 5),
                   **{k: round(v, 5) for k, v in parts.items()}, "seconds": round(state.seconds, 1)}
            state.history.append(row)
            eta = state.seconds / state.step * (config.steps - state.step)
            log(f"[hyperscale] vae step {state.step}/{config.steps} loss {row['loss']:.4f} test mse {test_mse:.4f} "
                f"psnr {10 * math.log10(4 / test_mse):.2f} dB  eta {eta / 60:.0f} min")
        if state.step % config.checkpoint_every == 0 or state.step == stop:
            save()
    return vae.eval(), state


def save_vae(vae: nn.Module, out: Path, scale_images: Tensor, card: dict) -> Path:
    """``save_pretrained`` with ``scaling_factor = 1 / std(latents)`` of ``scale_images``, plus a card; atomic."""
    vae.eval()
    std = latent_std(vae, scale_images)
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    with atomic_dir(out) as tmp:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        (Path(tmp) / "training.json").write_text(json.dumps(card | {"latent_std": std}, indent=2) + "\n")
    return Path(out)
