"""A training round: one fit of a fresh classifier, the unit the methods repeat.

The data gate (methods/data_gate.py) fits with and without synthetic images, once
more per fold; pseudo-labelling (methods/pseudo.py) refits on each round's labels.
They decide only *what* a round trains on; *how* (backbone, params, device,
checkpoints, objective) is the train stage's, which hands them a
:class:`TrainingRound`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from cellpipe.engine.data import ImageDataset
from cellpipe.engine.fit import FitResult
from cellpipe.nets.classifier import Classifier


class FittedRound(NamedTuple):
    """What a round returns: the classifier with its best weights loaded, and its fit."""

    model: Classifier
    result: FitResult


class TrainingRound(Protocol):
    """Fits a fresh classifier on given labelled images (see the stage's implementation)."""

    def __call__(self, images: np.ndarray, labels: np.ndarray, name: str, selection: str,
                 held_out: ImageDataset | None = None) -> FittedRound:
        """Fit on ``images``/``labels``, early-stopped on ``held_out`` (None: the val split).

        ``name`` names the round (its log tag and resumable checkpoint ``<name>.pt``);
        ``selection`` identifies the images added to the labelled ones (synthetic or
        pseudo-labelled), so that a checkpoint of another choice is never resumed.
        """
        ...
