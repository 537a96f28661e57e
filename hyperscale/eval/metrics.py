"""Sample-quality metrics on fixed features: FID, KID, precision/recall and class accuracy.

- FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
  local Nash equilibrium"): the Fréchet distance between Gaussians fitted to two feature
  sets.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the
  squared MMD with the cubic polynomial kernel, averaged over random subsets.
- Precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models"): the fraction of generated samples inside the k-NN manifold
  of the real features, and of real samples inside that of the generated ones. FID and KID
  fold fidelity and diversity into one number; a generator that repeats a few good samples
  keeps its precision and loses recall.

Here the features come from EfficientNet-Lite0 at 64 px (``features.py``), not from
Inception-v3: the numbers are relative, comparable between rows of one table (at equal
sample counts), never with Inception FID published on other data sets.

Pure NumPy/SciPy except :func:`evaluate_samples`, which runs the feature extractor and
the classifier on torch tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from hyperscale.eval.features import FeatureExtractor

FID_NOTE = "FID on EfficientNet-Lite0 features (relative; not comparable to Inception FID)"
KID_SUBSETS = 50
KID_SUBSET_SIZE = 1000
KID_SEED = 0
PR_K = 3  # the paper's default neighbourhood size
PR_SEED = 0  # the seeded reference subset (and generated subset, if larger) of precision/recall
PR_BLOCK = 2048  # rows and columns of one pairwise-distance block: 2048^2 float64 = 32 MiB
PR_NOTE = ("precision/recall: Kynkäänniemi et al. 2019, k-NN manifolds (k = pr_k), Euclidean on the "
           "same Lite0 features, pr_reference_size generated vs as many seeded reference features")


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


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})      (Heusel et al. 2017, eq. 6)

    mu: (D,), sigma: (D, D), both PSD. Tr (S1 S2)^{1/2} is computed exactly as the sum of
    square roots of the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, which
    has the same spectrum as S1 S2: two symmetric eigendecompositions, no general sqrtm
    (scipy's took ~50 s at D = 1280 on rank-deficient covariances and can come out complex).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    if not (np.all(np.isfinite(s1)) and np.all(np.isfinite(s2)) and np.all(np.isfinite(mu1 - mu2))):
        raise FloatingPointError("non-finite mean or covariance")
    diff = mu1 - mu2
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


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


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(a, D), (b, D) -> (a, b) squared Euclidean distances, ||x||^2 + ||y||^2 - 2 x.y clipped
    at 0 (exact for integer-valued features of moderate size)."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d, 0.0, out=d)


def _check_features(name: str, f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} features must be (N, D), got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise FloatingPointError(f"non-finite {name} features")
    return f


def _check_k(k: int, **counts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    for name, n in counts.items():
        if k >= n:
            raise ValueError(f"k = {k} needs more than k samples in each set (the k-th nearest "
                             f"neighbour excluding the point itself); {name} has {n}")


def knn_radii(features: np.ndarray, k: int = PR_K, block: int = PR_BLOCK) -> np.ndarray:
    """(N, D) -> (N,): the Euclidean distance from each point to its k-th nearest neighbour
    among the other N - 1 points (the point itself excluded by index, so a duplicate counts as
    a neighbour at distance 0). Needs N > k. Pairwise distances in ``block`` x ``block`` tiles."""
    f = _check_features("the", features)
    _check_k(k, set=len(f))
    return np.sqrt(_knn_sq_radii(f, k, block))


def _knn_sq_radii(f: np.ndarray, k: int, block: int) -> np.ndarray:
    # squared radii: membership compares squared distances with these, never with a re-squared root
    n = len(f)
    out = np.empty(n)
    for i in range(0, n, block):
        rows = f[i:i + block]
        best = np.full((len(rows), 0), np.inf)  # the k smallest squared distances so far, per row
        for j in range(0, n, block):
            d = _sq_dists(rows, f[j:j + block])
            if i == j:  # the diagonal tile: each row's own entry is the point itself
                d[np.arange(len(rows)), np.arange(len(rows))] = np.inf
            both = np.concatenate([best, d], axis=1)
            best = np.partition(both, k - 1, axis=1)[:, :k] if both.shape[1] > k else both
        out[i:i + len(rows)] = np.partition(best, k - 1, axis=1)[:, k - 1]
    return out


def precision_recall(features_gen: np.ndarray, features_real: np.ndarray, k: int = PR_K,
                     block: int = PR_BLOCK) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2): (precision, recall).

    With the k-NN radius r_k(phi) of each point among its own set (``knn_radii``), a point x is
    in the manifold of a set Phi when ||x - phi|| <= r_k(phi) for at least one phi in Phi:

        precision = fraction of generated features inside the manifold of the real ones
        recall    = fraction of real features inside the manifold of the generated ones

    Euclidean distances; features_gen (N_g, D), features_real (N_r, D), both with more than k
    rows. The paper compares equal counts (N_g = N_r): with unequal ones the larger set's
    denser manifold inflates the other metric, so callers pass equal counts
    (``evaluate_samples`` does). Pairwise distances in ``block`` x ``block`` tiles, so memory
    stays O(block^2 + N) for any N; the result does not depend on ``block``.
    """
    g, r = _check_features("generated", features_gen), _check_features("real", features_real)
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"feature shapes {g.shape} and {r.shape} do not match")
    _check_k(k, generated=len(g), real=len(r))
    rad2_g, rad2_r = _knn_sq_radii(g, k, block), _knn_sq_radii(r, k, block)
    gen_in_real = np.zeros(len(g), dtype=bool)
    real_in_gen = np.zeros(len(r), dtype=bool)
    for i in range(0, len(g), block):
        for j in range(0, len(r), block):
            d = _sq_dists(g[i:i + block], r[j:j + block])
            gen_in_real[i:i + block] |= (d <= rad2_r[None, j:j + block]).any(axis=1)
            real_in_gen[j:j + block] |= (d <= rad2_g[i:i + block, None]).any(axis=0)
    return float(gen_in_real.mean()), float(real_in_gen.mean())


def pr_sample_count(n_gen: int, n_ref: int) -> int:
    """How many generated and reference features precision/recall compares: equal counts,
    as many as both sets allow."""
    return min(int(n_gen), int(n_ref))


def precision_recall_vs_reference(features_gen: np.ndarray, features_ref: np.ndarray, k: int = PR_K,
                                  seed: int = PR_SEED) -> tuple[float, float]:
    """``precision_recall`` at equal counts: n = ``pr_sample_count(N_gen, N_ref)`` reference
    features drawn without replacement with a generator seeded by ``seed`` (the same subset for
    every row of equal N_gen), and all N_gen generated features (or, when N_gen > N_ref, n of
    them drawn by the same generator)."""
    fg, fr = np.asarray(features_gen), np.asarray(features_ref)
    n = pr_sample_count(len(fg), len(fr))
    rng = np.random.default_rng(seed)
    fr = fr[np.sort(rng.choice(len(fr), n, replace=False))]
    if len(fg) > n:
        fg = fg[np.sort(rng.choice(len(fg), n, replace=False))]
    return precision_recall(fg, fr, k)


def evaluate_samples(images: "Tensor", labels: "Tensor", ref_stats: ReferenceStats,
                     extractor: "FeatureExtractor", classifier: "nn.Module",
                     kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                     pr_k: int = PR_K) -> dict[str, float]:
    """Score generated samples.

    images: (N, 1, H, W) in [-1, 1]; labels: (N,) the class each sample was conditioned on.
    Returns {"fid", "kid", "precision", "recall", "class_acc"}: FID against ``ref_stats`` (mu,
    sigma of the reference set), KID against its cached feature subsample (``features``, 5,000
    seeded test images by default), precision/recall with k = ``pr_k`` against a seeded subset
    of that subsample of the same size as the samples (N = 2,000 in the quality suite: 2,000
    generated vs 2,000 reference features; ``precision_recall_vs_reference``), and the accuracy
    of ``classifier`` on the samples against ``labels``.
    """
    from hyperscale.models.classifier import class_accuracy

    feats = extractor(images)
    precision, recall = precision_recall_vs_reference(feats, ref_stats.features, k=pr_k)
    return {"fid": fid_from_features(feats, ref_stats),
            "kid": kid(feats, ref_stats.features, subsets=kid_subsets, subset_size=kid_subset_size),
            "precision": precision, "recall": recall,
            "class_acc": class_accuracy(classifier, images, labels)}
