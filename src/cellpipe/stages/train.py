"""Train stage: a transfer-learning (or from-scratch) classifier on the shards.

Phases: build (registry backbone + head, model I/O contract) → fit (the one loop,
resumable) → for ``pseudo_label``, rounds of labelling confident unlabeled images
and refitting → save the self-describing checkpoint, history, curves, metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from cellpipe.contract import ModelContract
from cellpipe.data.shards import SplitShard, open_split, read_meta
from cellpipe.engine.checkpoint import save_model
from cellpipe.engine.data import ImageDataset, image_loader
from cellpipe.engine.fit import FitParams, FitResult, fit, seed_everything
from cellpipe.engine.loop import Device, predict
from cellpipe.engine.pseudo import PseudoLabelParams, select_pseudo_labels
from cellpipe.errors import InputError
from cellpipe.fsutil import write_json
from cellpipe.nets.classifier import Classifier
from cellpipe.nets.registry import Backbone, build_backbone
from cellpipe.plots import training_curves

log = logging.getLogger(__name__)


class TrainParams(FitParams):
    """The ``train:`` section of params.yaml (the loop's settings plus these)."""

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    mean: list[float] | None = Field(None, description="override the weights' normalisation")
    std: list[float] | None = None
    dropout: float = Field(0.2, ge=0, lt=1)
    method: Literal["supervised", "pseudo_label"] = "supervised"
    pseudo_label: PseudoLabelParams = PseudoLabelParams()


@dataclass
class TrainOutcome:
    model: Classifier
    contract: ModelContract
    result: FitResult
    pseudo_labels: pd.DataFrame


def make_contract(meta: dict, backbone: Backbone, params: TrainParams) -> ModelContract:
    """The model I/O contract from the shards' description and the backbone's weights."""
    return ModelContract(
        class_names=tuple(meta["classes"]), image_size=meta["image_size"],
        mean=tuple(params.mean or backbone.mean), std=tuple(params.std or backbone.std),
        resize=meta["resize"], pad_value=meta["pad_value"], resample=meta["resample"],
        bit_depth_scaling=meta["bit_depth_scaling"],
    )


def train(shards: Path, params: TrainParams, *, device: Device, checkpoints: Path,
          fingerprint: str) -> TrainOutcome:
    """Fit with ``params.method``; ``checkpoints`` holds the resumable state of each round."""
    meta = read_meta(shards)
    seed_everything(params.seed)  # a backbone without pretrained weights is initialised here
    train_split, val_split = _labeled(open_split(shards, "train")), open_split(shards, "val")
    backbone = build_backbone(params.backbone, params.weights)
    contract = make_contract(meta, backbone, params)
    log.info("training %s (%s weights) on %d images, validating on %d; classes %s",
             params.backbone, params.weights, len(train_split.images), len(val_split.images),
             list(contract.class_names))
    val = ImageDataset(val_split.images, val_split.labels)

    def fit_round(images: np.ndarray, labels: np.ndarray, round_number: int,
                  selection: str) -> tuple[Classifier, FitResult]:
        fresh = backbone if round_number == 0 else build_backbone(params.backbone, params.weights)
        seed_everything(params.seed)  # the head's (and a scratch backbone's) initial weights
        model = Classifier(fresh, len(contract.class_names), params.dropout)
        tag = f"round {round_number}: " if params.method == "pseudo_label" else ""
        result = fit(model, fresh.pretrained, ImageDataset(images, labels), val, contract, params,
                     device, checkpoint=checkpoints / f"round{round_number}.pt",
                     fingerprint=f"{fingerprint}:{round_number}:{selection}", tag=tag)
        model.load_state_dict(result.best_state)
        return model, result

    model, result = fit_round(train_split.images, train_split.labels, 0, "")
    pseudo = pd.DataFrame(columns=["round", "unlabeled_row", "label", "confidence"])
    if params.method == "pseudo_label":
        model, result, pseudo = _pseudo_label_rounds(
            shards, params, contract, device, train_split, model, result, fit_round)
    return TrainOutcome(model, contract, result, pseudo)


def _pseudo_label_rounds(shards: Path, params: TrainParams, contract: ModelContract,
                         device: Device, labeled: SplitShard, model: Classifier,
                         result: FitResult, fit_round) -> tuple[Classifier, FitResult,
                                                                 pd.DataFrame]:
    """Label confident unlabeled images, refit from the pretrained weights, keep the best round.

    Each round starts again from the backbone's initial weights, so a wrong
    pseudo-label from round k cannot be reinforced by the weights that made it.
    """
    try:
        unlabeled = open_split(shards, "unlabeled")
    except InputError as error:
        raise InputError(f"method pseudo_label needs an 'unlabeled' split: {error}") from error
    best_model, best_result, history = model, result, list(result.history)
    records = []
    for round_number in range(1, params.pseudo_label.rounds + 1):
        loader = image_loader(ImageDataset(unlabeled.images, np.zeros(len(unlabeled.images),
                                                                      np.int64)),
                              contract, batch_size=params.batch_size)
        logits, _ = predict(device.prepare(model), loader, device, desc="pseudo-label")
        probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
        rows, labels = select_pseudo_labels(probabilities, params.pseudo_label)
        counts = np.bincount(labels, minlength=len(contract.class_names)).tolist()
        log.info("round %d: %d pseudo-labels per class %s (threshold %.2f)", round_number,
                 len(rows), counts, params.pseudo_label.threshold)
        records += [{"round": round_number, "unlabeled_row": int(r), "label": int(k),
                     "confidence": float(probabilities[r].max())}
                    for r, k in zip(rows, labels, strict=True)]
        images = np.concatenate([labeled.images, unlabeled.images[rows]])
        selection = hashlib.sha256(rows.tobytes() + labels.tobytes()).hexdigest()[:16]
        model, result = fit_round(images, np.concatenate([labeled.labels, labels]),
                                  round_number, selection)
        history += [{**row, "round": round_number} for row in result.history]
        if result.best_score > best_result.best_score:
            best_model, best_result = model, result
    best_result.history = history
    return best_model, best_result, pd.DataFrame.from_records(records)


def _labeled(split: SplitShard) -> SplitShard:
    keep = split.labels >= 0
    if keep.all():
        return split
    return SplitShard(split.images[keep], split.labels[keep], split.rows[keep])


def fingerprint_of(params: TrainParams, manifest: Path, shards: Path) -> str:
    """Identity of a training run: resume only a checkpoint with the same one.

    It covers params, data and cellpipe's own code: DVC reruns the stage when code
    changes, and a persisted checkpoint from older code must not be resumed then.
    """
    digest = hashlib.sha256(params.model_dump_json().encode())
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(source.read_bytes())
    digest.update(hashlib.sha256(manifest.read_bytes()).digest())
    digest.update(json.dumps(read_meta(shards), sort_keys=True).encode())
    return digest.hexdigest()


def run(shards: Path, manifest: Path, out: Path, model_path: Path, params: TrainParams, *,
        device: str = "auto") -> dict:
    """The stage as DVC runs it: checkpoint to ``model_path``, reports under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    outcome = train(shards, params, device=Device.pick(device), checkpoints=out / "checkpoints",
                    fingerprint=fingerprint_of(params, manifest, shards))
    manifest_sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    timed = pd.DataFrame.from_records(outcome.result.history)
    # Wall-clock seconds stay out of every tracked file: they differ on each run, and a
    # rerun that reproduces the same weights must leave dvc.lock and git unchanged.
    history = timed.drop(columns="seconds")
    save_model(model_path, outcome.model, outcome.contract, backbone=params.backbone,
               weights=params.weights, dropout=params.dropout,
               params=json.loads(params.model_dump_json()), manifest_sha256=manifest_sha,
               val_macro_f1=outcome.result.best_score,
               history=history.to_dict(orient="records"))
    history.to_csv(out / "history.csv", index=False)
    outcome.pseudo_labels.to_csv(out / "pseudo_labels.csv", index=False)
    training_curves(history, out / "curves.png")
    best = history.loc[history["val_macro_f1"].idxmax()]
    metrics = {
        "val_macro_f1": float(best["val_macro_f1"]),
        "val_accuracy": float(best["val_accuracy"]),
        "epochs": len(history),
        "pseudo_labels": len(outcome.pseudo_labels),
    }
    write_json(out / "metrics.json", metrics)
    log.info("best val macro-F1 %.4f after %d epochs (%.1f s); model saved to %s",
             metrics["val_macro_f1"], metrics["epochs"], timed["seconds"].sum(), model_path)
    return metrics
