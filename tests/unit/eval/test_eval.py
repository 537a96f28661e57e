"""hyperscale.eval: metric closed forms, the Lite0 feature extractor, the shipped
classifier, grids and plots. Fast (small sample counts); runs on one CPU thread."""
from __future__ import annotations

import ast
import json

import numpy as np
import pytest
import torch

from hyperscale.storage.local import REPO
from hyperscale.data.fashion_mnist import load_fashion_mnist
from hyperscale.eval import features as features_mod
from hyperscale.models.classifier import (DEFAULT_DIR, ClassifierConfig, FashionClassifier, class_accuracy,
                                        classifier_card, load_classifier, save_classifier)
from hyperscale.eval.features import FEATURE_DIM, IMAGE_SIZE, FeatureExtractor, reference_stats
from hyperscale.eval.images import plot_fid_vs_steps, save_grid
from hyperscale.eval.metrics import (ReferenceStats, evaluate_samples, fid_from_features, frechet_distance,
                                     gaussian_stats, kid, knn_radii, mmd2_unbiased, precision_recall,
                                     precision_recall_vs_reference)

EVAL_DIR = REPO / "hyperscale" / "eval"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- metrics: closed forms

def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(400, 24)) @ np.random.default_rng(1).normal(size=(24, 24))
    mu, sigma = gaussian_stats(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_fid_closed_form_diagonal_gaussians():
    # d^2 = ||mu1-mu2||^2 + sum_i (a_i + b_i - 2 sqrt(a_i b_i)) for diagonal covariances
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.5, 3.0, 8), rng.uniform(0.5, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fid_closed_form_scaled_full_covariance():
    # S2 = c S1 (full, non-diagonal)  =>  Tr(S1 + S2 - 2 (S1 S2)^1/2) = Tr(S1) (1 + c - 2 sqrt(c))
    rng = np.random.default_rng(2)
    m = rng.normal(size=(6, 6))
    s1, c = m @ m.T + 0.1 * np.eye(6), 2.5
    mu = np.zeros(6)
    expected = np.trace(s1) * (1 + c - 2 * np.sqrt(c)) + 9.0
    assert frechet_distance(mu, s1, mu + np.eye(6)[0] * 3.0, c * s1) == pytest.approx(expected, rel=1e-8)


def test_fid_one_dimensional():
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]),
                            np.array([[1.0]])) == pytest.approx(4.0 + (2.0 - 1.0) ** 2)


def test_fid_singular_covariances_are_finite():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.5   # rank 19 < 64
    fid = fid_from_features(f1, ReferenceStats(*gaussian_stats(f2), features=f2, count=20))
    assert np.isfinite(fid) and fid > 0


def test_mmd2_unbiased_matches_the_definition():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(6, 3)) + 1.0
    k = lambda u, v: (u @ v / 3 + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / 30
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(600, 32)), rng.normal(size=(600, 32))
    same = kid(a, b, subsets=20, subset_size=300)
    shifted = kid(a, b + 0.5, subsets=20, subset_size=300)
    assert abs(same) < 0.01
    assert shifted > 0.1 and shifted > 20 * abs(same)
    assert kid(a, b, subsets=20, subset_size=300) == same          # seeded


# ---------------------------------------------------------------- precision / recall (Kynkäänniemi et al. 2019)

def _pr_by_definition(gen, real, k):
    """The paper's definition, written out with loops: f(x, S) = 1 iff ||x - s|| <= ||s - NN_k(s)||
    for some s in S (NN_k: the k-th nearest other member of S)."""
    def radii(s):
        return [sorted(np.linalg.norm(s[i] - s[j]) for j in range(len(s)) if j != i)[k - 1] for i in range(len(s))]

    def inside(x, s, r):
        return any(np.linalg.norm(x - s[j]) <= r[j] for j in range(len(s)))
    rg, rr = radii(gen), radii(real)
    return (np.mean([inside(x, real, rr) for x in gen]), np.mean([inside(x, gen, rg) for x in real]))


def test_precision_recall_1d_by_hand():
    real = np.array([[0.0], [1.0], [3.0], [7.0], [20.0]])
    gen = np.array([[0.5], [1.5], [2.0], [-4.0], [-1.0]])
    # k = 1: real radii 1, 1, 2, 4, 13 -> balls [-1,1] [0,2] [1,5] [3,11] [7,33]: 0.5, 1.5, 2 in, -4 out,
    # -1 in (exactly on the boundary of 0's ball: <= counts) -> precision 4/5.
    # generated radii (0.5: 1, 1.5: 0.5, 2: 0.5, -4: 3, -1: 1.5) -> balls [-7,-1] [-2.5,0.5] [-0.5,1.5]
    # [1,2] [1.5,2.5]: real 0 and 1 in, 3, 7, 20 out -> recall 2/5.
    np.testing.assert_array_equal(knn_radii(real, 1), [1, 1, 2, 4, 13])
    np.testing.assert_array_equal(knn_radii(gen, 1), [1, 0.5, 0.5, 3, 1.5])
    assert precision_recall(gen, real, k=1) == (0.8, 0.4)
    # k = 2: real radii 3, 2, 3, 6, 17 (-4 alone outside); generated radii 1.5, 1, 1.5, 4.5, 2.5 ->
    # balls reach 3.5 (from 2), so real 0, 1, 3 in -> recall 3/5.
    np.testing.assert_array_equal(knn_radii(real, 2), [3, 2, 3, 6, 17])
    assert precision_recall(gen, real, k=2) == (0.8, 0.6)
    assert precision_recall(real, gen, k=1) == (0.4, 0.8)  # swapping the sets swaps the metrics


def test_precision_recall_2d_by_hand_and_an_outlier_ball():
    # real: the corners of a 2x2 square and a far point; k = 2: each corner's radius is 2 (two
    # neighbours at 2), the far point's is |(10,10)-(2,0)| = sqrt(164) ~ 12.8: a real outlier's
    # large ball (the paper's Sec. 2 caveat) takes (5,5) in.
    real = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [10, 10]], dtype=float)
    np.testing.assert_allclose(knn_radii(real, 2), [2, 2, 2, 2, np.sqrt(164)])
    gen = np.array([[1, 1], [5, 5], [-3, 0], [20, 20], [4, 0]], dtype=float)
    # (1,1) in (corners), (5,5) in (the far point's ball), (-3,0) out (3 > 2 from (0,0)),
    # (20,20) out (14.1 > 12.8), (4,0) in (exactly 2 from (2,0))
    precision, _ = precision_recall(gen, real, k=2)
    assert precision == 0.6
    assert precision_recall(gen, real, k=2) == pytest.approx(_pr_by_definition(gen, real, 2))


def test_precision_recall_match_the_definition_on_random_sets_with_ties():
    rng = np.random.default_rng(7)
    for k in (1, 3, 5):
        real = rng.integers(-3, 4, size=(40, 3)).astype(float)  # integer grid: many exact ties, exact distances
        gen = rng.integers(-2, 5, size=(33, 3)).astype(float)
        assert precision_recall(gen, real, k=k) == _pr_by_definition(gen, real, k)


def test_identical_sets_have_precision_and_recall_one():
    f = np.random.default_rng(8).normal(size=(120, 16))
    assert precision_recall(f, f.copy()) == (1.0, 1.0)
    assert precision_recall(f, f[::-1].copy(), k=1) == (1.0, 1.0)
    # duplicates inside a set are neighbours at distance 0 (only the point itself is excluded)
    np.testing.assert_array_equal(knn_radii(np.array([[0.0], [0.0], [5.0]]), 1), [0, 0, 5])


def test_mode_collapse_keeps_precision_and_loses_recall():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(500, 8))
    collapsed = real[0] + 0.01 * rng.normal(size=(500, 8))  # every sample a near copy of one real point
    p, r = precision_recall(collapsed, real)
    assert p > 0.95 and r < 0.02
    fresh_p, fresh_r = precision_recall(rng.normal(size=(500, 8)), real)
    assert fresh_r > 0.5 and r < fresh_r / 20


def test_far_outliers_lower_precision_and_keep_recall():
    rng = np.random.default_rng(10)
    real, gen = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    clean_p, clean_r = precision_recall(gen, real)
    noisy = gen.copy()
    noisy[::4] = 40.0 + 5.0 * rng.normal(size=(125, 8))   # a quarter far from every real point
    p, r = precision_recall(noisy, real)
    assert p == pytest.approx(clean_p * 0.75, abs=0.03) and p < clean_p - 0.15
    assert r > 0.8 * clean_r and clean_r > 0.5


def test_precision_recall_do_not_depend_on_the_block_size():
    rng = np.random.default_rng(11)
    real, gen = rng.normal(size=(301, 12)), rng.normal(size=(257, 12)) + 0.3
    whole = precision_recall(gen, real, k=3, block=10_000)
    for block in (1, 7, 64, 300):
        assert precision_recall(gen, real, k=3, block=block) == whole
        np.testing.assert_allclose(knn_radii(real, 3, block=block), knn_radii(real, 3, block=10_000), rtol=1e-12)
    d = np.linalg.norm(real[:, None] - real[None], axis=-1)
    np.testing.assert_allclose(knn_radii(real, 3, block=7), np.sort(d, axis=1)[:, 3], rtol=1e-9)  # col 0: self


def test_precision_recall_reject_bad_k_and_shapes():
    f = np.random.default_rng(12).normal(size=(10, 4))
    with pytest.raises(ValueError, match="k = 3 needs more than k samples.*generated has 3"):
        precision_recall(f[:3], f)
    with pytest.raises(ValueError, match="k = 10 needs more than k samples.*real has 10"):
        precision_recall(np.vstack([f, f]), f, k=10)
    with pytest.raises(ValueError, match="set has 4"):
        knn_radii(f[:4], k=4)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            precision_recall(f, f, k=bad)
    with pytest.raises(ValueError, match="do not match"):
        precision_recall(f, f[:, :3])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        precision_recall(f[0], f)


def test_precision_recall_vs_reference_uses_equal_seeded_counts():
    rng = np.random.default_rng(13)
    ref, gen = rng.normal(size=(50, 6)), rng.normal(size=(20, 6))
    pr = precision_recall_vs_reference(gen, ref)
    idx = np.sort(np.random.default_rng(0).choice(50, 20, replace=False))
    assert pr == precision_recall(gen, ref[idx]) and pr == precision_recall_vs_reference(gen, ref)
    # more generated samples than reference features: n of each
    big = rng.normal(size=(80, 6))
    r2 = np.random.default_rng(0)
    ridx = np.sort(r2.choice(50, 50, replace=False))
    gidx = np.sort(r2.choice(80, 50, replace=False))
    assert precision_recall_vs_reference(big, ref) == precision_recall(big[gidx], ref[ridx])


# ---------------------------------------------------------------- features

@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor()


@pytest.fixture(scope="module")
def test_images():
    x, y = load_fashion_mnist("test").tensors()
    return x, y


def test_extractor_loads_offline_and_is_deterministic(extractor, test_images):
    x = test_images[0][:12]
    f1, f2 = extractor(x), extractor(x)
    assert IMAGE_SIZE == 64 and extractor.image_size == IMAGE_SIZE
    assert f1.shape == (12, FEATURE_DIM) and f1.dtype == np.float64
    assert np.isfinite(f1).all() and f1.std() > 0
    np.testing.assert_array_equal(f1, f2)
    assert extractor.preprocess(x[:2]).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert extractor(torch.zeros(2, 1, 32, 32)).shape == (2, FEATURE_DIM)   # any input size


def test_real_vs_real_fid_much_smaller_than_real_vs_noised(extractor, test_images):
    x = test_images[0]
    g = torch.Generator().manual_seed(0)
    f_a, f_b = extractor(x[:200]), extractor(x[200:400])
    noised = (x[:200] + 0.5 * torch.randn(x[:200].shape, generator=g)).clamp(-1, 1)
    f_n = extractor(noised)
    ref = ReferenceStats(*gaussian_stats(f_b), features=f_b, count=len(f_b))
    fid_real, fid_noise = fid_from_features(f_a, ref), fid_from_features(f_n, ref)
    assert 0 < fid_real < 0.5 * fid_noise
    assert kid(f_a, f_b, subsets=10, subset_size=200) < kid(f_n, f_b, subsets=10, subset_size=200)
    # precision/recall on the same features: two disjoint real sets vs noised images vs one image repeated
    real_p, real_r = precision_recall(f_a, f_b)
    noise_p, _ = precision_recall(f_n, f_b)
    copies_p, copies_r = precision_recall(np.repeat(f_a[:1], 200, axis=0), f_b)
    assert real_p > 0.5 and real_r > 0.5
    assert noise_p < 0.5 * real_p
    assert copies_r < 0.05 and copies_r < 0.1 * real_r


def test_reference_stats_are_cached_by_settings(extractor, tmp_path, monkeypatch):
    path = tmp_path / "ref.npz"
    ref = reference_stats(extractor, limit=40, cache_path=path, kid_reference_size=30)
    assert path.is_file() and ref.count == 40
    assert ref.mu.shape == (FEATURE_DIM,) and ref.sigma.shape == (FEATURE_DIM, FEATURE_DIM)
    assert ref.features.shape == (30, FEATURE_DIM)

    def fail(_):
        raise AssertionError("recomputed despite a valid cache")
    monkeypatch.setattr(extractor, "features32", fail)
    again = reference_stats(extractor, limit=40, cache_path=path, kid_reference_size=30)
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    assert again.key == ref.key
    monkeypatch.undo()
    # other settings (a different subsample size) change the key: recomputed and replaced
    other = reference_stats(extractor, limit=40, cache_path=path, kid_reference_size=20)
    assert other.key != ref.key and other.features.shape == (20, FEATURE_DIM)


# ---------------------------------------------------------------- classifier

@pytest.fixture(scope="module")
def classifier():
    return load_classifier(DEFAULT_DIR)


def test_shipped_classifier_accuracy(classifier, test_images):
    x, y = test_images
    acc = class_accuracy(classifier, x[:1000], y[:1000])
    assert acc >= 0.85
    card = classifier_card(DEFAULT_DIR)
    assert card["test_accuracy"] >= 0.85
    assert (DEFAULT_DIR / "model.safetensors").stat().st_size < 2_000_000


def test_classifier_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = FashionClassifier(ClassifierConfig(channels=(4, 8, 8), hidden=16)).eval()
    save_classifier(model, tmp_path, {"test_accuracy": 0.1})
    back = load_classifier(tmp_path)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(back(x), model(x))
    assert json.loads((tmp_path / "classifier.json").read_text())["config"]["hidden"] == 16


def test_evaluate_samples(extractor, classifier, test_images, tmp_path):
    x, y = test_images
    ref = reference_stats(extractor, limit=100, cache_path=tmp_path / "r.npz", kid_reference_size=100)
    out = evaluate_samples(x[100:160], y[100:160], ref, extractor, classifier,
                           kid_subsets=5, kid_subset_size=50)
    assert set(out) == {"fid", "kid", "precision", "recall", "class_acc"}
    assert all(np.isfinite(v) for v in out.values())
    assert (out["precision"], out["recall"]) == precision_recall_vs_reference(extractor(x[100:160]), ref.features)
    assert out["precision"] > 0.5 and out["recall"] > 0.5   # real test images against the (disjoint) reference
    assert out["class_acc"] >= 0.8
    shifted = (y[100:160] + 1) % 10
    assert class_accuracy(classifier, x[100:160], shifted) < 0.2


# ---------------------------------------------------------------- images

def test_save_grid_writes_png_of_right_size(tmp_path):
    from PIL import Image
    imgs = torch.linspace(-1, 1, 12 * 28 * 28).view(12, 1, 28, 28)
    path = save_grid(imgs, tmp_path / "sub" / "grid.png", nrow=4)
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.size == (4 * 30 + 2, 3 * 30 + 2) and im.mode == "L"
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]    # no temp files left


def test_plot_fid_vs_steps(tmp_path):
    rows = [{"generator": "teacher-ddim", "steps": s, "fid": 100.0 / s} for s in (1, 2, 4, 8, 25, 50)]
    rows += [{"generator": "sim-l2", "steps": 1, "fid": 3.0},
             {"generator": "real-data", "steps": 0, "fid": 1.0},
             {"generator": "cd-baseline", "steps": 2, "fid": None}]
    path = plot_fid_vs_steps(rows, tmp_path / "fid.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


# ---------------------------------------------------------------- layering

def test_eval_imports_neither_ray_nor_deepspeed():
    for src in EVAL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(src.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"ray", "deepspeed"}, f"{src.name} imports {name}"
    assert features_mod.IMAGE_SIZE == IMAGE_SIZE
