"""Sample-quality metrics: FID, Inception Score, improved precision/recall, and the
feature extractors behind them (FID InceptionV3; small classifiers for digits/toy2d)."""
from gdistill.metrics.classifier import classifier_accuracy
from gdistill.metrics.classifier import classifier_features
from gdistill.metrics.classifier import ClassifierState
from gdistill.metrics.classifier import get_or_train_classifier
from gdistill.metrics.classifier import load_classifier
from gdistill.metrics.classifier import save_classifier
from gdistill.metrics.classifier import train_classifier
from gdistill.metrics.frechet import feature_stats
from gdistill.metrics.frechet import fid_from_features
from gdistill.metrics.frechet import frechet_distance
from gdistill.metrics.inception import FIDInceptionV3
from gdistill.metrics.inception import inception_features
from gdistill.metrics.inception import load_inception_params
from gdistill.metrics.inception_score import inception_score
from gdistill.metrics.prd import precision_recall
from gdistill.metrics.prd import PrecisionRecall
from gdistill.metrics.reference import reference_stats

__all__ = [
    "ClassifierState", "FIDInceptionV3", "PrecisionRecall", "classifier_accuracy",
    "classifier_features", "feature_stats", "fid_from_features", "frechet_distance",
    "get_or_train_classifier", "inception_features", "inception_score",
    "load_classifier", "load_inception_params", "precision_recall", "reference_stats",
    "save_classifier", "train_classifier",
]
