"""Classification metrics, calibration error and temperature scaling.

scikit-learn computes the scores; what it lacks (expected calibration error with
its bins, temperature fitting) is small and written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats
import torch
from sklearn.metrics import (
    accuracy_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def classification_report(labels: np.ndarray, probabilities: np.ndarray,
                          class_names: Sequence[str]) -> dict:
    """Accuracy, per-class P/R/F1 and one-vs-rest ROC-AUC, and their macro averages.

    Every macro average (balanced accuracy = macro recall, macro precision, macro-F1,
    macro ROC-AUC) is over the same classes: those present in ``labels``. A class with
    no image in the split has no recall or AUC to average, and counting it as 0 (as
    f1_score with every label would) says nothing about the model; it is listed in
    ``absent_classes`` instead, with its per-class row (support 0) still reported.
    """
    predictions = probabilities.argmax(axis=1)
    every_class = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=every_class, zero_division=0)
    present = [k for k in every_class if support[k] > 0]
    per_class = {
        name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
               "support": int(support[k]), "roc_auc": _one_vs_rest_auc(labels, probabilities, k)}
        for k, name in enumerate(class_names)
    }
    aucs = [per_class[class_names[k]]["roc_auc"] for k in present]
    aucs = [auc for auc in aucs if auc is not None]  # None: a split of one class only
    macro_precision, macro_recall, macro_f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=present or every_class, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(macro_recall),
        "macro_precision": float(macro_precision),
        "macro_recall": float(macro_recall),
        "macro_f1": float(macro_f1),
        "roc_auc_ovr_macro": float(np.mean(aucs)) if aucs else None,
        "classes_averaged": [class_names[k] for k in present],
        "absent_classes": [class_names[k] for k in every_class if k not in present],
        "per_class": per_class,
    }


def _one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray, k: int) -> float | None:
    positives = labels == k
    if positives.all() or not positives.any():
        return None  # undefined with one class only
    return float(roc_auc_score(positives, probabilities[:, k]))


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray,
                     bins: int = 15) -> pd.DataFrame:
    """Per equal-width confidence bin: count, mean confidence, accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        rows.append({"low": edges[b], "high": edges[b + 1], "count": int(members.sum()),
                     "confidence": float(confidence[members].mean()) if members.any() else 0.0,
                     "accuracy": float(correct[members].mean()) if members.any() else 0.0})
    return pd.DataFrame(rows)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray,
                               bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy − confidence| over confidence bins."""
    table = calibration_bins(labels, probabilities, bins)
    weights = table["count"] / max(len(labels), 1)
    return float((weights * (table["accuracy"] - table["confidence"]).abs()).sum())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017)."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) > 0
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def macro_f1_gain_lower_bound(labels: np.ndarray, before: np.ndarray, after: np.ndarray, *,
                              confidence: float = 0.9, resamples: int = 2000,
                              seed: int = 0) -> float:
    """One-sided lower confidence bound of macro-F1(after) − macro-F1(before).

    A paired percentile bootstrap over the images (scipy): both prediction sets are
    resampled together, so the bound reflects how much the gain depends on which
    images happen to be in a small validation split.
    """
    every_class = np.unique(labels)

    def gain(y: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return _macro_f1(y, b, every_class, axis) - _macro_f1(y, a, every_class, axis)

    if np.array_equal(before, after):
        return 0.0  # no image changed: every resample gains exactly nothing
    result = scipy.stats.bootstrap((labels, before, after), gain, paired=True,
                                   vectorized=True, n_resamples=resamples,
                                   confidence_level=confidence, alternative="greater",
                                   method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low)


def _macro_f1(labels: np.ndarray, predictions: np.ndarray, classes: np.ndarray,
              axis: int = -1) -> np.ndarray:
    """Macro-F1 along ``axis`` for a whole stack of resamples at once.

    The same number as scikit-learn's f1_score(average="macro", zero_division=0) for
    one resample (tested), but vectorised: the bootstrap needs thousands of them.
    """
    scores = []
    for k in classes:
        truth, said = labels == k, predictions == k
        true_positive = (truth & said).sum(axis=axis)
        wrong = (truth ^ said).sum(axis=axis)  # false positives + false negatives
        denominator = 2 * true_positive + wrong
        scores.append(np.where(denominator > 0, 2 * true_positive / np.maximum(denominator, 1),
                               0.0))
    return np.mean(scores, axis=0)
