"""The GAN's training pool: the labelled train images and, optionally, pseudo-labelled ones.

A class-conditional GAN learns each class only from images labelled with it, and a
scarce set (melanoma: 160 labelled train images) is far too little for that. With
``augment.unlabeled.enabled`` a linear probe (logistic regression on the offline
EfficientNet-Lite0 features of the labelled train images) labels the ``unlabeled``
split; its confident predictions, within the per-class caps of engine/selection.py,
join the pool. The GAN then learns from thousands of images, and its samples'
labels are as right as the probe's, which is measured on val and reported.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from cellpipe.engine.selection import PseudoLabelSelection, select_pseudo_labels
from cellpipe.errors import InputError
from cellpipe.gan.fit import GanData
from cellpipe.gan.quality import FeatureSpace

log = logging.getLogger(__name__)

# 1,280 features from a few hundred images: regularise more than sklearn's C=1. On the
# melanoma set the probe's val and test accuracy hardly move between C=0.01 and 1.
PROBE_C = 0.1
PSEUDO_LABEL_COLUMNS = ["unlabeled_row", "label", "confidence"]


class UnlabeledPoolParams(PseudoLabelSelection):
    """The ``augment.unlabeled:`` section: which probe predictions join the GAN's pool."""

    enabled: bool = False
    max_per_class: int = Field(3000, ge=1)


def fit_probe(features: FeatureSpace, images: np.ndarray, labels: np.ndarray) -> Pipeline:
    """Logistic regression (balanced class weights) on the features of labelled images."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(
        C=PROBE_C, class_weight="balanced", max_iter=5000))
    return probe.fit(embed(features, images), labels)


def embed(features: FeatureSpace, images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×3 images → N×D features."""
    batch = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2)
    return features.embed(batch).numpy()


def pseudo_labelled_pool(train: GanData, unlabeled: np.ndarray, val: GanData,
                         class_names: list[str], params: UnlabeledPoolParams,
                         features: FeatureSpace) -> tuple[GanData, pd.DataFrame, dict]:
    """The train images plus the probe's confident labels on ``unlabeled``.

    Returns the pool, one row per chosen unlabeled image (its row, label and the probe's
    confidence) and metrics: the probe's val accuracy and macro-F1 and the counts.
    """
    seen = np.unique(train.labels)
    if len(seen) < 2:
        raise InputError("augment.unlabeled: the probe that labels the unlabeled split needs "
                         f"labelled train images of two classes or more; train has {len(seen)}")
    if len(unlabeled) == 0:
        log.warning("GAN pool: the unlabeled split is empty; the GAN learns from train only")
        return train, pd.DataFrame(columns=PSEUDO_LABEL_COLUMNS), {"pseudo_labelled_images": 0}
    probe = fit_probe(features, train.images, train.labels)
    val_predicted = probe.predict(embed(features, val.images)) if len(val.labels) else None
    probabilities = probe.predict_proba(embed(features, unlabeled))
    # predict_proba's columns are the classes the probe saw; the caps work per column.
    rows, columns = select_pseudo_labels(probabilities, params)
    labels = probe.classes_[columns].astype(np.int64)
    chosen = pd.DataFrame({"unlabeled_row": rows, "label": [class_names[k] for k in labels],
                           "confidence": probabilities[rows].max(axis=1)},
                          columns=PSEUDO_LABEL_COLUMNS)
    # Before the threshold and caps: how the probe splits the whole unlabeled set.
    predicted = probe.classes_[probabilities.argmax(axis=1)]
    metrics = {"pseudo_labelled_images": int(len(rows)),
               "pseudo_labelled_per_class": _per_class(labels, class_names),
               "probe_predicted_per_class": _per_class(predicted, class_names)}
    if val_predicted is not None:
        metrics.update(probe_val_accuracy=float(accuracy_score(val.labels, val_predicted)),
                       probe_val_macro_f1=float(f1_score(val.labels, val_predicted,
                                                         average="macro", zero_division=0)))
    log.info("GAN pool: %d labelled train images + %d pseudo-labelled of %d unlabeled %s "
             "(threshold %.2f; probe val accuracy %.3f)", len(train.labels), len(rows),
             len(unlabeled), metrics["pseudo_labelled_per_class"], params.threshold,
             metrics.get("probe_val_accuracy", float("nan")))
    pool = GanData(np.concatenate([train.images, unlabeled[rows]]),
                   np.concatenate([train.labels, labels]))
    return pool, chosen, metrics


def _per_class(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    counts = np.bincount(labels.astype(np.int64), minlength=len(class_names))
    return {name: int(n) for name, n in zip(class_names, counts, strict=True)}
