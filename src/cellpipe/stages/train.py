"""Train stage: a transfer-learning (or from-scratch) classifier on the shards.

Phases: build (registry backbone + head, model I/O contract) → fit (the one loop,
resumable; ``sgan`` and ``fixmatch`` plug their objective into it) → for
``pseudo_label``, rounds of labelling confident unlabeled images and refitting →
save the self-describing checkpoint, history, curves, metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from cellpipe.contract import ModelContract
from cellpipe.data.geometry import CropGeometry
from cellpipe.data.shards import SplitShard, labeled, open_split, read_meta
from cellpipe.data.synthetic import open_synthetic, read_synthetic_meta
from cellpipe.engine import distributed
from cellpipe.engine.checkpoint import run_fingerprint, save_model
from cellpipe.engine.data import ImageDataset, build_augment, image_loader
from cellpipe.engine.fit import FitParams, FitResult, fit, seed_everything
from cellpipe.engine.fixmatch import FixMatch, FixMatchParams, TwoViews, build_strong_augment
from cellpipe.engine.loop import Device, Objective, predict
from cellpipe.engine.metrics import macro_f1_gain_lower_bound
from cellpipe.engine.pseudo import PseudoLabelParams, select_pseudo_labels
from cellpipe.engine.sgan import SemiSupervisedGan, SganParams
from cellpipe.errors import InputError
from cellpipe.fsutil import write_json
from cellpipe.nets.classifier import Classifier
from cellpipe.nets.registry import Backbone, build_backbone
from cellpipe.plots import image_gallery, training_curves

log = logging.getLogger(__name__)


class TrainParams(FitParams):
    """The ``train:`` section of params.yaml (the loop's settings plus these)."""

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    backbone_blocks: int | None = Field(
        None, ge=1, description="keep only the first N backbone blocks (mid-level features, "
                                "for small images far from ImageNet); null keeps all")
    mean: list[float] | None = Field(None, description="override the weights' normalisation")
    std: list[float] | None = None
    dropout: float = Field(0.2, ge=0, lt=1)
    method: Literal["supervised", "pseudo_label", "sgan", "fixmatch"] = "supervised"
    pseudo_label: PseudoLabelParams = PseudoLabelParams()
    sgan: SganParams = SganParams()
    fixmatch: FixMatchParams = FixMatchParams()
    synthetic: Literal["gate", "always", "never"] = Field(
        "gate", description="use the augment stage's synthetic images: gate = only if they "
                            "raise val macro-F1 by synthetic_margin, with confidence")
    synthetic_margin: float = Field(0.01, gt=0, description="the data gate's required gain")
    synthetic_confidence: float = Field(
        0.9, ge=0.5, lt=1, description="the gain's bootstrap lower bound at this one-sided "
                                       "confidence must reach synthetic_margin")
    synthetic_folds: int = Field(
        0, ge=0, description="0: the gate judges the gain on val; k >= 2: on out-of-fold "
                             "predictions of a stratified k-fold over train + val (more "
                             "images behind the decision, k + 1 times the training)")

    @field_validator("synthetic_folds")
    @classmethod
    def _folds_are_zero_or_several(cls, folds: int) -> int:
        if folds == 1:
            raise ValueError("synthetic_folds is 0 (judge on val) or at least 2")
        return folds


@dataclass
class TrainOutcome:
    model: Classifier
    contract: ModelContract
    result: FitResult
    pseudo_labels: pd.DataFrame
    gate: dict = field(default_factory=dict)  # the data gate's numbers, if it ran
    generated: np.ndarray | None = None       # sgan: samples of the final generator


def make_contract(meta: dict, backbone: Backbone, params: TrainParams) -> ModelContract:
    """The model I/O contract from the shards' description and the backbone's weights."""
    return ModelContract(
        class_names=tuple(meta["classes"]), image_size=meta["image_size"],
        mean=tuple(params.mean or backbone.mean), std=tuple(params.std or backbone.std),
        resize=meta["resize"], pad_value=meta["pad_value"], resample=meta["resample"],
        bit_depth_scaling=meta["bit_depth_scaling"],
        crop=CropGeometry(**meta["crop"]) if meta.get("crop") else None,
    )


def _build_backbone(params: TrainParams) -> Backbone:
    return build_backbone(params.backbone, params.weights, params.backbone_blocks)


def train(shards: Path, params: TrainParams, *, device: Device, checkpoints: Path,
          fingerprint: str, synthetic: Path | None = None) -> TrainOutcome:
    """Fit with ``params.method``; ``checkpoints`` holds the resumable state of each round.

    With a ``synthetic`` folder (the augment stage's), the data gate decides whether its
    images join the training split (see :func:`_data_gate`).
    """
    meta = read_meta(shards)
    seed_everything(params.seed)  # a backbone without pretrained weights is initialised here
    train_split, val_split = labeled(open_split(shards, "train")), open_split(shards, "val")
    backbone = _build_backbone(params)
    contract = make_contract(meta, backbone, params)
    log.info("training %s (%s weights, %s) on %d images, validating on %d; classes %s",
             params.backbone, params.weights,
             f"first {params.backbone_blocks} blocks" if params.backbone_blocks else "all blocks",
             len(train_split.images), len(val_split.images), list(contract.class_names))
    val = ImageDataset(val_split.images, val_split.labels)
    unused = [backbone]  # the first round trains the backbone built above, later ones anew
    objectives: list[Objective] = []

    def fit_round(images: np.ndarray, labels: np.ndarray, name: str, selection: str,
                  held_out: ImageDataset = val) -> tuple[Classifier, FitResult]:
        fresh = unused.pop() if unused else _build_backbone(params)
        seed_everything(params.seed)  # the head's (and a scratch backbone's) initial weights
        model = Classifier(fresh, len(contract.class_names), params.dropout)
        tag = f"{name}: " if name != "round0" else ""
        objective = _objective(shards, contract, params)  # a fresh one (generator) per fit
        objectives.append(objective)
        result = fit(model, fresh.pretrained, ImageDataset(images, labels), held_out, contract,
                     params, device, checkpoint=checkpoints / f"{name}.pt",
                     fingerprint=f"{fingerprint}:{name}:{selection}", tag=tag,
                     objective=objective)
        model.load_state_dict(result.best_state)
        return model, result

    model, result = fit_round(train_split.images, train_split.labels, "round0", "")
    gate: dict = {}
    if synthetic is not None and params.synthetic != "never":
        model, result, train_split, gate = _data_gate(
            open_synthetic(synthetic, meta), train_split, labeled(val_split), model, result,
            params, fit_round)
    pseudo = pd.DataFrame(columns=["round", "unlabeled_row", "label", "confidence"])
    if params.method == "pseudo_label":
        model, result, pseudo = _pseudo_label_rounds(
            shards, params, contract, device, train_split, model, result, fit_round)
    last = objectives[-1]
    generated = last.samples() if isinstance(last, SemiSupervisedGan) else None
    return TrainOutcome(model, contract, result, pseudo, gate, generated)


def _objective(shards: Path, contract: ModelContract, params: TrainParams) -> Objective:
    """What each epoch optimises: supervised, or a semi-supervised objective over the
    unlabelled split (augmented as the training images are)."""
    if params.method not in ("sgan", "fixmatch"):
        return Objective()
    unlabeled = open_split(shards, "unlabeled", needed_by=f"method {params.method}").images
    augment = build_augment(params.augment, contract.pad_value)
    if params.method == "sgan":
        dataset = ImageDataset(unlabeled, np.zeros(len(unlabeled), np.int64), augment)
        return SemiSupervisedGan(dataset, contract, params.sgan, params.batch_size)
    strong = build_strong_augment(augment, params.fixmatch, contract.pad_value)
    return FixMatch(TwoViews(unlabeled, augment, strong), contract, params.fixmatch,
                    params.batch_size, params.label_smoothing)


def _data_gate(synthetic: SplitShard, real: SplitShard, val: SplitShard,
               model: Classifier, result: FitResult, params: TrainParams, fit_round
               ) -> tuple[Classifier, FitResult, SplitShard, dict]:
    """Train again with the synthetic images added (same seed, params and epochs); keep
    them only if val macro-F1 rises by ``synthetic_margin`` with ``synthetic_confidence``
    (or ``synthetic: always``).

    The gain is judged by its paired-bootstrap lower bound, not by its point value: on a
    40-image val split one image moves macro-F1 by several points, and a gain that
    noise can produce is no reason to train on generated images. With
    ``synthetic_folds`` the bound comes from out-of-fold predictions over train + val
    instead, so every labelled image is evidence (see :func:`_cross_validated_gain`).
    Returns the chosen model, its fit, the training split it used and the gate's numbers.
    """
    if len(synthetic.labels) == 0:
        return model, result, real, {"synthetic_images": 0, "synthetic_used": False}
    combined = _join(real, synthetic)
    selection = str(synthetic.rows["generator_sha256"].iloc[0])[:16]
    with_model, with_result = fit_round(combined.images, combined.labels, "synthetic", selection)
    evidence = (val.labels, result.best_val_predictions, with_result.best_val_predictions)
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
        return with_model, with_result, combined, gate
    return model, result, real, gate


def _join(first: SplitShard, second: SplitShard) -> SplitShard:
    return SplitShard(np.concatenate([first.images, second.images]),
                      np.concatenate([first.labels, second.labels]),
                      pd.concat([first.rows, second.rows], ignore_index=True))


def _cross_validated_gain(real: SplitShard, val: SplitShard, synthetic: SplitShard,
                          selection: str, params: TrainParams, fit_round
                          ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict]:
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


def _pseudo_label_rounds(shards: Path, params: TrainParams, contract: ModelContract,
                         device: Device, labeled: SplitShard, model: Classifier,
                         result: FitResult, fit_round) -> tuple[Classifier, FitResult,
                                                                 pd.DataFrame]:
    """Label confident unlabeled images, refit from the pretrained weights, keep the best round.

    Each round starts again from the backbone's initial weights, so a wrong
    pseudo-label from round k cannot be reinforced by the weights that made it.
    """
    unlabeled = open_split(shards, "unlabeled", needed_by="method pseudo_label")
    best_model, best_result, history = model, result, list(result.history)
    records = []
    for round_number in range(1, params.pseudo_label.rounds + 1):
        loader = image_loader(ImageDataset(unlabeled.images, np.zeros(len(unlabeled.images),
                                                                      np.int64)),
                              contract, batch_size=params.batch_size)
        logits, _ = predict(device.prepare(model), loader, device, desc="pseudo-label")
        probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
        rows, labels = select_pseudo_labels(probabilities, params.pseudo_label)
        # Under torchrun every rank must refit on the same images: rank 0's choice.
        rows, labels = distributed.broadcast_object((rows, labels))
        counts = np.bincount(labels, minlength=len(contract.class_names)).tolist()
        log.info("round %d: %d pseudo-labels per class %s (threshold %.2f)", round_number,
                 len(rows), counts, params.pseudo_label.threshold)
        records += [{"round": round_number, "unlabeled_row": int(r), "label": int(k),
                     "confidence": float(probabilities[r].max())}
                    for r, k in zip(rows, labels, strict=True)]
        images = np.concatenate([labeled.images, unlabeled.images[rows]])
        selection = hashlib.sha256(rows.tobytes() + labels.tobytes()).hexdigest()[:16]
        model, result = fit_round(images, np.concatenate([labeled.labels, labels]),
                                  f"round{round_number}", selection)
        history += [{**row, "round": round_number} for row in result.history]
        if result.best_score > best_result.best_score:
            best_model, best_result = model, result
    best_result.history = history
    return best_model, best_result, pd.DataFrame.from_records(records)


def fingerprint_of(params: TrainParams, manifest: Path, shards: Path,
                   synthetic: Path | None = None) -> str:
    """Identity of a training run (params, data, synthetic data, code): see run_fingerprint."""
    inputs: list[Path | dict] = [manifest, read_meta(shards)]
    if synthetic is not None:
        inputs += [read_synthetic_meta(synthetic), synthetic / "train" / "rows.parquet"]
    return run_fingerprint(params, *inputs, code=__name__)


def run(shards: Path, manifest: Path, out: Path, model_path: Path, params: TrainParams, *,
        synthetic: Path | None = None, device: str = "auto") -> dict:
    """The stage as DVC runs it: checkpoint to ``model_path``, reports under ``out``.

    Under ``torchrun`` every rank trains (DDP: see engine/distributed.py) and rank 0
    alone writes; the other ranks wait for it and return its metrics.
    """
    picked = Device.pick(device)
    with distributed.process_group(picked.torch_device):
        outcome = train(shards, params, device=picked, checkpoints=out / "checkpoints",
                        fingerprint=fingerprint_of(params, manifest, shards, synthetic),
                        synthetic=synthetic)
        metrics = (_write_outputs(outcome, params, manifest, out, model_path)
                   if distributed.is_main() else None)
        # Also the other ranks' barrier: they return once rank 0's outputs are on disk.
        return distributed.broadcast_object(metrics)


def _write_outputs(outcome: TrainOutcome, params: TrainParams, manifest: Path, out: Path,
                   model_path: Path) -> dict:
    """Checkpoint, history, curves and metrics of a finished run (rank 0's job under DDP)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    timed = pd.DataFrame.from_records(outcome.result.history)
    # Wall-clock seconds stay out of every tracked file: they differ on each run, and a
    # rerun that reproduces the same weights must leave dvc.lock and git unchanged.
    history = timed.drop(columns="seconds")
    save_model(model_path, outcome.model, outcome.contract, backbone=params.backbone,
               backbone_blocks=params.backbone_blocks, weights=params.weights,
               dropout=params.dropout,
               params=json.loads(params.model_dump_json()), manifest_sha256=manifest_sha,
               val_macro_f1=outcome.result.best_score, data_gate=outcome.gate,
               history=history.to_dict(orient="records"))
    history.to_csv(out / "history.csv", index=False)
    outcome.pseudo_labels.to_csv(out / "pseudo_labels.csv", index=False)
    training_curves(history, out / "curves.png")
    if outcome.generated is not None:  # a look at what the classifier learnt to reject
        image_gallery(outcome.generated, [""] * len(outcome.generated),
                        out / "sgan_generated.png", title="sgan: generated images")
    best = history.loc[history["val_macro_f1"].idxmax()]
    metrics = {
        "val_macro_f1": float(best["val_macro_f1"]),
        "val_accuracy": float(best["val_accuracy"]),
        "epochs": len(history),
        "pseudo_labels": len(outcome.pseudo_labels),
        **outcome.gate,
    }
    write_json(out / "metrics.json", metrics)
    log.info("best val macro-F1 %.4f after %d epochs (%.1f s); model saved to %s",
             metrics["val_macro_f1"], metrics["epochs"], timed["seconds"].sum(), model_path)
    return metrics
