"""The data gate: the augment stage's synthetic images join training only if they help.

Train again with the synthetic images added (same seed, params and epochs) and keep
them only if val macro-F1 rises by ``synthetic_margin`` with ``synthetic_confidence``
(or ``synthetic: always``). The gain is judged by its paired-bootstrap lower bound,
not by its point value: on a 40-image val split one image moves macro-F1 by several
points, and a gain that noise can produce is no reason to train on generated images.
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from cellpipe.data.shards import SplitShard
from cellpipe.engine.data import ImageDataset
from cellpipe.engine.metrics import macro_f1_gain_lower_bound
from cellpipe.errors import InputError
from cellpipe.methods.rounds import FittedRound, TrainingRound

log = logging.getLogger(__name__)

# (labels, predictions without the synthetic images, predictions with them)
Evidence = tuple[np.ndarray, np.ndarray, np.ndarray]


class DataGateParams(Protocol):
    """The settings the gate reads: the ``train.synthetic*`` keys and ``train.seed``
    (the stage's TrainParams has them all)."""

    @property
    def synthetic(self) -> Literal["gate", "always", "never"]: ...

    @property
    def synthetic_margin(self) -> float: ...

    @property
    def synthetic_confidence(self) -> float: ...

    @property
    def synthetic_folds(self) -> int: ...

    @property
    def seed(self) -> int: ...


def data_gate(synthetic: SplitShard, real: SplitShard, val: SplitShard, without: FittedRound,
              params: DataGateParams, fit_round: TrainingRound
              ) -> tuple[FittedRound, SplitShard, dict]:
    """Decide whether ``synthetic`` joins ``real`` (the training split).

    ``without`` is the fit on ``real`` alone. With ``synthetic_folds`` the bound comes
    from out-of-fold predictions over train + val instead of val, so every labelled
    image is evidence (see :func:`_cross_validated_gain`). Returns the chosen fit, the
    training split it used and the gate's numbers.
    """
    if len(synthetic.labels) == 0:
        return without, real, {"synthetic_images": 0, "synthetic_used": False}
    combined = _join(real, synthetic)
    selection = str(synthetic.rows["generator_sha256"].iloc[0])[:16]
    grown = fit_round(combined.images, combined.labels, "synthetic", selection)
    result, with_result = without.result, grown.result
    evidence: Evidence = (val.labels, result.best_val_predictions,
                          with_result.best_val_predictions)
    gate = {"synthetic_images": int(len(synthetic.labels)),
            "val_macro_f1_without_synthetic": result.best_score,
            "val_macro_f1_with_synthetic": with_result.best_score}
    if params.synthetic_folds:
        evidence, cross_validated = _cross_validated_gain(real, val, synthetic, selection,
                                                          params, fit_round)
        gate.update(cross_validated)
    lower_bound = macro_f1_gain_lower_bound(*evidence, confidence=params.synthetic_confidence,
                                            seed=params.seed)
    used = params.synthetic == "always" or lower_bound >= params.synthetic_margin
    gate.update({"val_macro_f1_gain_lower_bound": lower_bound,
                 "synthetic_margin": params.synthetic_margin,
                 "synthetic_confidence": params.synthetic_confidence,
                 "synthetic_folds": params.synthetic_folds, "synthetic_used": used})
    judged_on = (f"{params.synthetic_folds}-fold out-of-fold, {len(evidence[0])} images"
                 if params.synthetic_folds else f"val, {len(evidence[0])} images")
    log.info("data gate: val macro-F1 %.4f without, %.4f with %d synthetic images (gain %+.4f; "
             "%.0f%% lower bound %+.4f on %s, margin %.4f): synthetic images %s",
             result.best_score, with_result.best_score, len(synthetic.labels),
             with_result.best_score - result.best_score, 100 * params.synthetic_confidence,
             lower_bound, judged_on, params.synthetic_margin, "kept" if used else "rejected")
    if used:
        return grown, combined, gate
    return without, real, gate


def _join(first: SplitShard, second: SplitShard) -> SplitShard:
    """One split of both splits' images, labels and rows, in that order."""
    return SplitShard(np.concatenate([first.images, second.images]),
                      np.concatenate([first.labels, second.labels]),
                      pd.concat([first.rows, second.rows], ignore_index=True))


def _cross_validated_gain(real: SplitShard, val: SplitShard, synthetic: SplitShard,
                          selection: str, params: DataGateParams, fit_round: TrainingRound
                          ) -> tuple[Evidence, dict]:
    """Out-of-fold predictions without and with the synthetic images, over train + val.

    A stratified k-fold over every labelled image: each fold is held out once, and
    trains (with early stopping on it) without and with the synthetic images, which
    only ever join the training folds. Returns (labels, predictions without, with) for
    the bootstrap, and the out-of-fold macro-F1s.
    """
    pool = _join(real, val)
    fewest = int(np.unique(pool.labels, return_counts=True)[1].min(initial=len(pool.labels)))
    if fewest < params.synthetic_folds:
        raise InputError(f"train.synthetic_folds is {params.synthetic_folds}, but a class has "
                         f"only {fewest} labelled images in train + val; lower it or use 0")
    without = np.empty_like(pool.labels, dtype=np.int64)
    with_synthetic = np.empty_like(without)
    folds = StratifiedKFold(params.synthetic_folds, shuffle=True, random_state=params.seed)
    for k, (fit_rows, held_rows) in enumerate(folds.split(pool.labels, pool.labels)):
        held_out = ImageDataset(pool.images[held_rows], pool.labels[held_rows])
        images, labels = pool.images[fit_rows], pool.labels[fit_rows]
        _, plain = fit_round(images, labels, f"gate_fold{k}", "", held_out)
        _, grown = fit_round(np.concatenate([images, synthetic.images]),
                             np.concatenate([labels, synthetic.labels]),
                             f"gate_fold{k}_synthetic", selection, held_out)
        without[held_rows] = plain.best_val_predictions
        with_synthetic[held_rows] = grown.best_val_predictions
    truth = pool.labels.astype(np.int64)
    scores = {"cv_macro_f1_without_synthetic": float(f1_score(truth, without, average="macro",
                                                               zero_division=0)),
              "cv_macro_f1_with_synthetic": float(f1_score(truth, with_synthetic,
                                                            average="macro", zero_division=0))}
    return (truth, without, with_synthetic), scores
