"""Pseudo-labels (``train.method: pseudo_label``): confident predictions on unlabeled
images become training labels, in rounds.

Each round labels the unlabeled split with the current model (within the threshold
and per-class caps of engine/selection.py), then refits on the labelled images plus
those, and the best round is kept.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from cellpipe.contract import ModelContract
from cellpipe.data.shards import SplitShard
from cellpipe.engine import distributed
from cellpipe.engine.data import ImageDataset, image_loader
from cellpipe.engine.loop import Device, predict
from cellpipe.engine.selection import PseudoLabelSelection, select_pseudo_labels
from cellpipe.methods.rounds import FittedRound, TrainingRound

log = logging.getLogger(__name__)


class PseudoLabelParams(PseudoLabelSelection):
    """The ``train.pseudo_label:`` section: the selection, repeated for ``rounds``."""

    rounds: int = Field(2, ge=1)


def pseudo_label_rounds(first: FittedRound, labeled: SplitShard, unlabeled: SplitShard,
                        contract: ModelContract, device: Device, params: PseudoLabelParams,
                        batch_size: int, fit_round: TrainingRound
                        ) -> tuple[FittedRound, pd.DataFrame]:
    """Label confident unlabeled images, refit from the pretrained weights, keep the best round.

    ``first`` is the fit on ``labeled`` alone (round 0). Each round starts again from
    the backbone's initial weights, so a wrong pseudo-label from round k cannot be
    reinforced by the weights that made it. Returns the best round (its history
    holds every round's epochs) and one row per pseudo-label of every round.
    """
    model, result = first
    best = first
    history = list(first.result.history)
    records = []
    for round_number in range(1, params.rounds + 1):
        loader = image_loader(ImageDataset(unlabeled.images, np.zeros(len(unlabeled.images),
                                                                      np.int64)),
                              contract, batch_size=batch_size)
        logits, _ = predict(device.prepare(model), loader, device, desc="pseudo-label")
        probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
        rows, labels = select_pseudo_labels(probabilities, params)
        # Under torchrun every rank must refit on the same images: rank 0's choice.
        rows, labels = distributed.broadcast_object((rows, labels))
        counts = np.bincount(labels, minlength=len(contract.class_names)).tolist()
        log.info("round %d: %d pseudo-labels per class %s (threshold %.2f)", round_number,
                 len(rows), counts, params.threshold)
        records += [{"round": round_number, "unlabeled_row": int(r), "label": int(k),
                     "confidence": float(probabilities[r].max())}
                    for r, k in zip(rows, labels, strict=True)]
        images = np.concatenate([labeled.images, unlabeled.images[rows]])
        selection = hashlib.sha256(rows.tobytes() + labels.tobytes()).hexdigest()[:16]
        model, result = fit_round(images, np.concatenate([labeled.labels, labels]),
                                  f"round{round_number}", selection)
        history += [{**row, "round": round_number} for row in result.history]
        if result.best_score > best.result.best_score:
            best = FittedRound(model, result)
    best.result.history = history
    return best, pd.DataFrame.from_records(records)
