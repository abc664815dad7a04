"""Confident predictions as labels: a threshold and two per-class caps.

Two caps keep one class from taking over an unlabeled pool: at most
``max_per_class`` images per class, and no class more than ``max_class_ratio``
times the smallest class that got any. Within a class, the most confident win.

Shared by the pseudo-label rounds of the train stage (methods/pseudo.py) and the
GAN's pseudo-labelled pool (gan/pool.py), so it lives here, below both.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from cellpipe.params import StageParams


class PseudoLabelSelection(StageParams):
    """Which confident predictions become labels: threshold and the two caps."""

    threshold: float = Field(0.9, gt=0, le=1)
    max_per_class: int = Field(1000, ge=1)
    max_class_ratio: float = Field(1.5, ge=1)


def select_pseudo_labels(probabilities: np.ndarray, params: PseudoLabelSelection
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ascending) of the chosen unlabeled rows and their labels."""
    confidence = probabilities.max(axis=1)
    predicted = probabilities.argmax(axis=1)
    chosen: dict[int, np.ndarray] = {}
    for label in range(probabilities.shape[1]):
        candidates = np.flatnonzero((predicted == label) & (confidence >= params.threshold))
        by_confidence = candidates[np.argsort(-confidence[candidates], kind="stable")]
        chosen[label] = by_confidence[:params.max_per_class]
    present = [len(rows) for rows in chosen.values() if len(rows)]
    if present:
        ratio_cap = max(1, math.floor(params.max_class_ratio * min(present)))
        chosen = {label: rows[:ratio_cap] for label, rows in chosen.items()}
    indices = np.concatenate([rows for rows in chosen.values()]).astype(np.int64)
    order = np.argsort(indices)
    return indices[order], predicted[indices][order]
