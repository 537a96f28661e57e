"""The denoising-error suite: where along the noise levels a denoiser is weak.

For each timestep t of a list, the first ``num_images`` Fashion-MNIST test images x0 are noised
with fixed seeded eps (the same eps for every model and, per t, a seed of its own), and each
denoiser, conditioned on the true class and unguided, predicts eps. A row holds the eps-MSE
(what the teacher was trained on) and the x0-MSE of the implied clean image, both per pixel in
model units ([-1, 1]). Comparing two teachers row by row says whether a change of recipe
reached the noise levels it aimed at (docs/benchmarks.md §3.4: the fine-tuned teacher).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hyperscale.storage.records import write_record


@dataclass
class DenoiseSettings:
    num_images: int = 1000
    timesteps: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 50, 100, 200, 400, 700, 999])
    seed: int = 0
    batch_size: int = 250
    threads: int = field(default_factory=lambda: torch.get_num_threads())


@torch.no_grad()
def denoising_error(model, x0: torch.Tensor, labels: torch.Tensor, t: int, seed: int,
                    batch_size: int = 250) -> tuple[float, float]:
    """(eps-MSE, x0-MSE) per pixel of ``model`` at integer timestep ``t`` over images x0 (N, C, H, W)."""
    from hyperscale.diffusion.schedule import Prediction, convert

    sched = model.schedule
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 100_003 + t))
    tt = torch.full((x0.shape[0],), t, dtype=torch.long)
    alpha, sigma = (v.to(x0.dtype) for v in sched.alpha_sigma(tt))
    eps_se = x0_se = 0.0
    for i in range(0, x0.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        x_t = sched.add_noise(x0[sl], eps[sl], tt[sl])
        eps_hat = model(x_t, tt[sl], labels[sl], out=Prediction.eps)
        x0_hat = convert(eps_hat, x_t, alpha[sl], sigma[sl], Prediction.eps, Prediction.x0)
        eps_se += float((eps_hat - eps[sl]).pow(2).sum())
        x0_se += float((x0_hat - x0[sl]).pow(2).sum())
    return eps_se / x0.numel(), x0_se / x0.numel()


def run_denoise(teacher_dir: str, others: dict[str, str], out_dir: str, s: DenoiseSettings,
                command: str | None = None, log=print) -> Path:
    """One row per (denoiser, t): the teacher (name "teacher") and each ``others`` name -> export.
    A row names its weights by sha256 (as the quality suite does), not by a machine's path."""
    from hyperscale.data.fashion_mnist import load_fashion_mnist
    from hyperscale.bench.quality import weights_digest
    from hyperscale.models.build import load_denoiser

    if "teacher" in others:
        raise ValueError("denoise suite: 'teacher' names the --teacher row; give the other denoiser another name")
    bad = [t for t in s.timesteps if t < 0]
    if bad or s.num_images < 1:
        raise ValueError(f"denoise suite: timesteps must be >= 0 and num_images >= 1 (got {s.timesteps}, "
                         f"{s.num_images})")
    torch.set_num_threads(s.threads)
    images, labels = load_fashion_mnist("test").tensors()
    x0, y = images[:s.num_images], labels[:s.num_images]
    rows = []
    for name, source in {"teacher": teacher_dir, **others}.items():
        model, digest = load_denoiser(source).eval(), weights_digest(source)
        last = model.schedule.num_train_timesteps - 1
        if max(s.timesteps) > last:
            raise ValueError(f"denoise suite: timestep {max(s.timesteps)} is past {name}'s grid (0..{last})")
        for t in s.timesteps:
            eps_mse, x0_mse = denoising_error(model, x0, y, t, s.seed, s.batch_size)
            rows.append({"denoiser": name, "weights_sha256": digest, "t": t,
                         "sigma_ve": float(model.schedule.sigma_ve(t)), "eps_mse": eps_mse, "x0_mse": x0_mse})
            log(f"[denoise] {name:>16} t {t:>4}  eps-MSE {eps_mse:.4f}  x0-MSE {x0_mse:.6f}")
    return write_record(Path(out_dir), "denoise", asdict(s), rows, command)
