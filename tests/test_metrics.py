"""Evaluation numbers against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from cellpipe.engine.metrics import (
    _macro_f1,
    classification_report,
    expected_calibration_error,
    fit_temperature,
    macro_f1_gain_lower_bound,
    softmax,
)
from cellpipe.engine.selection import select_pseudo_labels
from cellpipe.methods.pseudo import PseudoLabelParams

# Six predictions over three classes; the argmax is 0,0,1,1,2,0 for labels 0,1,1,2,2,0.
LABELS = np.array([0, 1, 1, 2, 2, 0])
PROBS = np.array([[0.8, 0.1, 0.1],
                  [0.6, 0.3, 0.1],
                  [0.2, 0.7, 0.1],
                  [0.3, 0.4, 0.3],
                  [0.1, 0.2, 0.7],
                  [0.9, 0.05, 0.05]])


def test_classification_report_matches_hand_computation() -> None:
    report = classification_report(LABELS, PROBS, ["a", "b", "c"])
    # Correct: rows 0, 2, 4, 5 → 4/6.
    assert report["accuracy"] == pytest.approx(4 / 6)
    # Recall per class: a 2/2, b 1/2, c 1/2 → balanced accuracy 2/3.
    assert report["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # Precision: a 2/3 (rows 0,1,5 predicted a), b 1/2 (rows 2,3), c 1/1.
    per_class = report["per_class"]
    assert per_class["a"]["precision"] == pytest.approx(2 / 3)
    assert per_class["b"]["precision"] == pytest.approx(1 / 2)
    assert per_class["c"]["precision"] == pytest.approx(1.0)
    f1 = {"a": 2 * (2 / 3) * 1 / (2 / 3 + 1), "b": 0.5, "c": 2 * 1 * 0.5 / 1.5}
    for name, value in f1.items():
        assert per_class[name]["f1"] == pytest.approx(value)
    assert report["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    # Class a vs rest: scores of positives 0.8, 0.9; negatives 0.6,0.2,0.3,0.1 → AUC 1.
    assert per_class["a"]["roc_auc"] == pytest.approx(1.0)
    # Class c vs rest: positives 0.3, 0.7; negatives 0.1,0.1,0.1,0.05 → AUC 1.
    assert per_class["c"]["roc_auc"] == pytest.approx(1.0)
    # Class b vs rest: positives 0.3, 0.7; negatives 0.1, 0.4, 0.2, 0.05 → 7 of 8 pairs.
    assert per_class["b"]["roc_auc"] == pytest.approx(7 / 8)


def test_expected_calibration_error_by_hand() -> None:
    # Two bins (0.5-1.0 split at 0.75 with bins=4 over [0,1]): confidences 0.6, 0.7 → bin 2,
    # 0.8, 0.9 → bin 3. Bin 2: mean conf 0.65, accuracy 1/2; bin 3: conf 0.85, accuracy 1.
    probs = np.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    labels = np.array([0, 1, 0, 0])
    expected = 0.5 * abs(0.5 - 0.65) + 0.5 * abs(1.0 - 0.85)
    assert expected_calibration_error(labels, probs, bins=4) == pytest.approx(expected)


def test_temperature_recovers_a_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 4)) * 2
    labels = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    fitted = fit_temperature(true_logits * 3.0, labels)  # a model 3× overconfident
    assert fitted == pytest.approx(3.0, rel=0.1)


def test_pseudo_labels_respect_threshold_and_caps() -> None:
    probs = np.array([[0.95, 0.05], [0.99, 0.01], [0.50, 0.50], [0.10, 0.90],
                      [0.97, 0.03], [0.20, 0.80], [0.91, 0.09], [0.92, 0.08]])
    rows, labels = select_pseudo_labels(
        probs, PseudoLabelParams(threshold=0.9, max_per_class=10, max_class_ratio=10))
    assert rows.tolist() == [0, 1, 3, 4, 6, 7] and labels.tolist() == [0, 0, 1, 0, 0, 0]
    # max_per_class: only the 2 most confident of class 0 (rows 1 and 4).
    rows, _ = select_pseudo_labels(
        probs, PseudoLabelParams(threshold=0.9, max_per_class=2, max_class_ratio=10))
    assert rows.tolist() == [1, 3, 4]
    # max_class_ratio 2: class 1 has one pseudo-label, so class 0 gets at most two.
    rows, labels = select_pseudo_labels(
        probs, PseudoLabelParams(threshold=0.9, max_per_class=10, max_class_ratio=2))
    assert rows.tolist() == [1, 3, 4] and np.bincount(labels).tolist() == [2, 1]
    assert (probs[rows].max(axis=1) >= 0.9).all()


def test_vectorised_macro_f1_equals_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    labels, predictions = rng.integers(0, 3, (50, 40)), rng.integers(0, 4, (50, 40))
    ours = _macro_f1(labels, predictions, np.arange(3))
    for row in range(50):
        expected = f1_score(labels[row], predictions[row], labels=[0, 1, 2], average="macro",
                            zero_division=0)
        assert ours[row] == pytest.approx(expected)


def test_gain_lower_bound_tells_noise_from_a_real_gain() -> None:
    labels = np.tile([0, 1], 20)                      # 40 val images, as on melanoma
    before = labels.copy()
    before[:12] = 1 - before[:12]                     # 12 wrong
    two_fixed = before.copy()
    two_fixed[:2] = labels[:2]
    swapped = two_fixed.copy()                        # fixes 2, breaks 2 others
    swapped[20:22] = 1 - swapped[20:22]
    ten_fixed = before.copy()
    ten_fixed[:10] = labels[:10]
    assert macro_f1_gain_lower_bound(labels, before, before) == 0.0
    assert macro_f1_gain_lower_bound(labels, before, swapped) < 0
    # Two more right answers out of 40 is +0.05 macro-F1 but within what chance gives.
    assert macro_f1_gain_lower_bound(labels, before, two_fixed) < 0.01
    assert macro_f1_gain_lower_bound(labels, before, ten_fixed) > 0.1


def test_macro_averages_cover_the_classes_present_and_name_the_absent() -> None:
    # Class c has no image here, but the model predicts it once (row 3, a b).
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
                      [0.1, 0.3, 0.6], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05]])
    report = classification_report(labels, probs, ["a", "b", "c"])
    assert report["absent_classes"] == ["c"] and report["classes_averaged"] == ["a", "b"]
    # a: recall 2/3, precision 2/2; b: recall 2/3, precision 2/3 (row 1 predicted b).
    f1 = {"a": 2 * 1 * (2 / 3) / (1 + 2 / 3), "b": 2 / 3}
    assert report["macro_f1"] == pytest.approx((f1["a"] + f1["b"]) / 2)
    assert report["balanced_accuracy"] == report["macro_recall"] == pytest.approx(2 / 3)
    assert report["macro_precision"] == pytest.approx((1 + 2 / 3) / 2)
    present_aucs = [report["per_class"][name]["roc_auc"] for name in ("a", "b")]
    assert report["roc_auc_ovr_macro"] == pytest.approx(np.mean(present_aucs))
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                        "support": 0, "roc_auc": None}


def test_with_every_class_present_the_averages_are_scikit_learns() -> None:
    from sklearn.metrics import balanced_accuracy_score

    report = classification_report(LABELS, PROBS, ["a", "b", "c"])
    predictions = PROBS.argmax(axis=1)
    assert report["absent_classes"] == []
    assert report["macro_f1"] == f1_score(LABELS, predictions, labels=[0, 1, 2],
                                          average="macro", zero_division=0)
    assert report["balanced_accuracy"] == balanced_accuracy_score(LABELS, predictions)
