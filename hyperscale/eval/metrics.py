"""Sample-quality metrics on fixed features: FID, KID and class accuracy.

- FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
  local Nash equilibrium"): the Fréchet distance between Gaussians fitted to two feature
  sets.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the
  squared MMD with the cubic polynomial kernel, averaged over random subsets.

Here the features come from EfficientNet-Lite0 at 64 px (``features.py``), not from
Inception-v3: the numbers are relative, comparable between rows of one table (at equal
sample counts), never with Inception FID published on other data sets.

Pure NumPy/SciPy except :func:`evaluate_samples`, which runs the feature extractor and
the classifier on torch tensors.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import linalg

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from hyperscale.eval.features import FeatureExtractor

FID_NOTE = "FID on EfficientNet-Lite0 features (relative; not comparable to Inception FID)"
# Offset added to both covariances when sqrtm(S1 S2) fails (singular product).
SQRTM_EPS = 1e-6
# Largest imaginary part tolerated on the diagonal of sqrtm(S1 S2) before it is an error.
IMAG_TOL = 1e-3
# Relative error ||X X - A||_F / ||A||_F above which the sqrtm result is not trusted.
SQRTM_REL_TOL = 1e-3
KID_SUBSETS = 50
KID_SUBSET_SIZE = 1000
KID_SEED = 0


@dataclass
class ReferenceStats:
    """Statistics of a reference feature set.

    mu: (D,) mean; sigma: (D, D) covariance (ddof=1), both float64, over all ``count``
    reference images. features: (M, D) a seeded subsample of the reference features,
    kept for KID. key: hash of the settings that produced them (see ``features.py``).
    """
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    count: int
    key: str = ""


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D), float64, ddof=1."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N>=2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Matrix square root of ``a`` and its relative residual ||X X - A||_F / ||A||_F."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x = linalg.sqrtm(a)
    if not np.all(np.isfinite(x)):
        return x, float("inf")
    denom = max(float(np.linalg.norm(a)), np.finfo(np.float64).tiny)
    return x, float(np.linalg.norm(x @ x - a) / denom)


def _max_diag_imag(x: np.ndarray) -> float:
    return float(np.max(np.abs(np.diagonal(x).imag))) if np.iscomplexobj(x) else 0.0


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})      (Heusel et al. 2017, eq. 6)

    mu: (D,), sigma: (D, D). When S1 S2 is near-singular (few samples, D large), sqrtm
    can fail, be inaccurate or come out with a clearly complex diagonal; then both
    covariances get ``SQRTM_EPS`` on the diagonal and the root is recomputed. A small
    imaginary residue (diagonal |imag| <= ``IMAG_TOL``) is dropped; a larger one that
    survives the offset raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean, err = _sqrtm(s1 @ s2)
    if err > SQRTM_REL_TOL or _max_diag_imag(covmean) > IMAG_TOL:
        offset = np.eye(len(mu1)) * SQRTM_EPS
        covmean, err = _sqrtm((s1 + offset) @ (s2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise FloatingPointError("sqrtm(S1 S2) is not finite even with the eps offset")
    if _max_diag_imag(covmean) > IMAG_TOL:
        raise ValueError(f"sqrtm(S1 S2) has a large imaginary component ({_max_diag_imag(covmean):.3g})")
    covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(features_gen: np.ndarray, ref: ReferenceStats) -> float:
    """FID of generated features (N, D) against reference statistics."""
    mu, sigma = gaussian_stats(features_gen)
    return frechet_distance(mu, sigma, ref.mu, ref.sigma)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # k(x, y) = (x·y / d + 1)^3      (Bińkowski et al. 2018, Sec. 4 "KID")
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel; x: (m, D), y: (n, D).

    MMD^2_u = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1))
              - 2 sum_{i,j} k(x_i,y_j) / (mn)          (Gretton et al. 2012, eq. 3)
    """
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("MMD^2_u needs at least 2 samples per set")
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def kid(features_gen: np.ndarray, features_ref: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> float:
    """Kernel Inception Distance on given features: mean of ``subsets`` unbiased MMD^2
    estimates, each on ``min(subset_size, N_gen, N_ref)`` samples drawn without
    replacement from each set with a seeded generator. Can be slightly negative when the
    sets match (the estimator is unbiased)."""
    fg = np.asarray(features_gen, dtype=np.float64)
    fr = np.asarray(features_ref, dtype=np.float64)
    if fg.ndim != 2 or fr.ndim != 2 or fg.shape[1] != fr.shape[1]:
        raise ValueError(f"feature shapes {fg.shape} and {fr.shape} do not match")
    size = min(subset_size, len(fg), len(fr))
    rng = np.random.default_rng(seed)
    estimates = [mmd2_unbiased(fg[rng.choice(len(fg), size, replace=False)],
                               fr[rng.choice(len(fr), size, replace=False)])
                 for _ in range(subsets)]
    return float(np.mean(estimates))


def evaluate_samples(images: "Tensor", labels: "Tensor", ref_stats: ReferenceStats,
                     extractor: "FeatureExtractor", classifier: "nn.Module",
                     kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                     ) -> dict[str, float]:
    """Score generated samples.

    images: (N, 1, H, W) in [-1, 1]; labels: (N,) the class each sample was conditioned on.
    Returns {"fid", "kid", "class_acc"}: FID against ``ref_stats`` (mu, sigma of the
    reference set), KID against its cached feature subsample, and the accuracy of
    ``classifier`` on the samples against ``labels``.
    """
    from hyperscale.eval.classifier import class_accuracy

    feats = extractor(images)
    return {"fid": fid_from_features(feats, ref_stats),
            "kid": kid(feats, ref_stats.features, subsets=kid_subsets, subset_size=kid_subset_size),
            "class_acc": class_accuracy(classifier, images, labels)}
