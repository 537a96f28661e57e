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
                                     gaussian_stats, kid, mmd2_unbiased)

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
    assert set(out) == {"fid", "kid", "class_acc"}
    assert all(np.isfinite(v) for v in out.values())
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
