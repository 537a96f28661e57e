"""Evaluation: EfficientNet-Lite0 features, FID/KID, a Fashion-MNIST classifier for class
accuracy, image grids and plots. Imports neither ray nor deepspeed."""
from hyperscale.models.classifier import (FashionClassifier, class_accuracy, load_classifier,
                                        save_classifier, train_classifier)
from hyperscale.eval.features import IMAGE_SIZE, FeatureExtractor, reference_stats
from hyperscale.eval.images import plot_fid_vs_steps, save_grid
from hyperscale.eval.metrics import (FID_NOTE, ReferenceStats, evaluate_samples, fid_from_features,
                                     frechet_distance, kid)

__all__ = ["IMAGE_SIZE", "FID_NOTE", "FashionClassifier", "FeatureExtractor", "ReferenceStats",
           "class_accuracy", "evaluate_samples", "fid_from_features", "frechet_distance", "kid",
           "load_classifier", "plot_fid_vs_steps", "reference_stats", "save_classifier", "save_grid",
           "train_classifier"]
