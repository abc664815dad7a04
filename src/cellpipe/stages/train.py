"""Train stage: fit a classifier on the shards (transfer learning, from scratch, semi-supervised).

Phases: build (registry backbone + head, model I/O contract) → fit (the one loop,
resumable; ``sgan`` and ``fixmatch`` plug their objective into it) → for
``pseudo_label``, rounds of labelling confident unlabeled images and refitting →
save the self-describing checkpoint, history, curves, metrics.

A stopped run still yields a model: on SIGINT or SIGTERM the best weights of the
checkpoints on disk are saved as ``model.pt``, marked partial (``info["partial"]``,
also in metrics.json and the export's card), before the command exits non-zero; and
``--export-best`` does the same for a run that was killed outright. Rerunning the
command resumes the run from its checkpoints either way.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from cellpipe.contract import ModelContract
from cellpipe.data.geometry import CropGeometry
from cellpipe.data.shards import labeled, open_split, read_meta
from cellpipe.data.synthetic import open_synthetic, read_synthetic_meta
from cellpipe.engine import distributed
from cellpipe.engine.checkpoint import load_checkpoint, run_fingerprint, save_model
from cellpipe.engine.data import ImageDataset, build_train_augmentation
from cellpipe.engine.fit import FitParams, FitResult, fit, seed_everything
from cellpipe.engine.loop import Device, Objective
from cellpipe.errors import InputError, Interrupted
from cellpipe.fsutil import write_json
from cellpipe.methods.data_gate import data_gate
from cellpipe.methods.fixmatch import FixMatch, FixMatchParams, TwoViews, build_strong_augment
from cellpipe.methods.pseudo import PseudoLabelParams, pseudo_label_rounds
from cellpipe.methods.rounds import FittedRound
from cellpipe.methods.sgan import SemiSupervisedGan, SganParams
from cellpipe.nets.classifier import Classifier
from cellpipe.nets.registry import Backbone, build_backbone
from cellpipe.plots import image_gallery, training_curves
from cellpipe.stages.options import add_device, add_path

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
    partial: dict | None = None  # a stopped run's best weights so far: how far it got


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
    images join the training split (see methods/data_gate.py).
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
    absent = [name for k, name in enumerate(contract.class_names) if k not in val_split.labels]
    if absent:
        log.warning("val holds no image of class %s: val macro-F1, which picks the best epoch, "
                    "averages the %d classes it holds", ", ".join(absent),
                    len(contract.class_names) - len(absent))
    rounds = _ClassifierRounds(shards, contract, params, device, checkpoints, fingerprint,
                               ImageDataset(val_split.images, val_split.labels), backbone)
    fitted = rounds(train_split.images, train_split.labels, "round0", "")
    gate: dict = {}
    if synthetic is not None and params.synthetic != "never":
        fitted, train_split, gate = data_gate(open_synthetic(synthetic, meta), train_split,
                                              labeled(val_split), fitted, params, rounds)
    pseudo = _no_pseudo_labels()
    if params.method == "pseudo_label":
        unlabeled = open_split(shards, "unlabeled", needed_by="method pseudo_label")
        fitted, pseudo = pseudo_label_rounds(fitted, train_split, unlabeled, contract, device,
                                             params.pseudo_label, params.batch_size, rounds)
    last = rounds.objectives[-1]
    generated = last.samples() if isinstance(last, SemiSupervisedGan) else None
    return TrainOutcome(fitted.model, contract, fitted.result, pseudo, gate, generated)


@dataclass
class _ClassifierRounds:
    """The stage's training round (methods/rounds.py: TrainingRound): a fresh classifier
    on ``params``' backbone, fit by the one loop with the method's objective, its
    resumable state in ``checkpoints/<name>.pt``."""

    shards: Path
    contract: ModelContract
    params: TrainParams
    device: Device
    checkpoints: Path
    fingerprint: str
    val: ImageDataset  # what a round early-stops on unless it is given another split
    # The backbone built (right after seeding) for the contract: the first round trains
    # it; taken once, then every later round builds its own.
    first_backbone: Backbone | None
    objectives: list[Objective] = field(default_factory=list)  # each round's, in order

    def __call__(self, images: np.ndarray, labels: np.ndarray, name: str, selection: str,
                 held_out: ImageDataset | None = None) -> FittedRound:
        """Fit one round; see methods.rounds.TrainingRound for the arguments."""
        backbone = self._take_backbone()
        params = self.params
        seed_everything(params.seed)  # the head's (and a scratch backbone's) initial weights
        model = Classifier(backbone, len(self.contract.class_names), params.dropout)
        tag = f"{name}: " if name != "round0" else ""
        # A fresh objective per fit: SGAN's generator and FixMatch's state start anew.
        objective = _objective(self.shards, self.contract, params)
        self.objectives.append(objective)
        result = fit(model, backbone.pretrained, ImageDataset(images, labels),
                     self.val if held_out is None else held_out, self.contract, params,
                     self.device, checkpoint=self.checkpoints / f"{name}.pt",
                     fingerprint=f"{self.fingerprint}:{name}:{selection}", tag=tag,
                     objective=objective)
        model.load_state_dict(result.best_state)
        return FittedRound(model, result)

    def _take_backbone(self) -> Backbone:
        """The first round's backbone is the one built with the contract; later rounds
        build a new one, so that each starts from the initial weights."""
        backbone, self.first_backbone = self.first_backbone, None
        return backbone if backbone is not None else _build_backbone(self.params)


def _objective(shards: Path, contract: ModelContract, params: TrainParams) -> Objective:
    """What each epoch optimises: supervised, or a semi-supervised objective over the
    unlabelled split (augmented as the training images are)."""
    if params.method not in ("sgan", "fixmatch"):
        return Objective()
    unlabeled = open_split(shards, "unlabeled", needed_by=f"method {params.method}").images
    augment = build_train_augmentation(params.augment, contract.pad_value)
    if params.method == "sgan":
        dataset = ImageDataset(unlabeled, np.zeros(len(unlabeled), np.int64), augment)
        return SemiSupervisedGan(dataset, contract, params.sgan, params.batch_size)
    strong = build_strong_augment(augment, params.fixmatch, contract.pad_value)
    return FixMatch(TwoViews(unlabeled, augment, strong), contract, params.fixmatch,
                    params.batch_size, params.label_smoothing)


def best_so_far(shards: Path, params: TrainParams, *, checkpoints: Path, fingerprint: str,
                reason: str) -> TrainOutcome | None:
    """The best weights that this run's checkpoints hold, as a partial outcome; None before
    the first epoch ended.

    Every round that early-stops on the val split is a candidate (the first fit, the
    data gate's with synthetic images, pseudo-label rounds), and the best val macro-F1
    wins; the gate's folds early-stop on parts of train, so their scores do not compare.
    Checkpoints of other params, data or code (another fingerprint) are not this run's.
    """
    candidates = []
    for path in sorted(checkpoints.glob("*.pt")):
        if path.stem.startswith("gate_fold"):
            continue
        saved = load_checkpoint(path)
        if not saved.get("history"):
            continue
        if not str(saved.get("fingerprint")).startswith(f"{fingerprint}:{path.stem}:"):
            log.info("ignoring %s: it belongs to other params, data or code", path)
            continue
        candidates.append((saved["best_score"], path.stem, saved))
    if not candidates:
        return None
    _, name, saved = max(candidates, key=lambda candidate: candidate[0])  # the first best
    result = FitResult(saved["best_score"], saved["best_state"], saved["history"],
                       saved["best_val_predictions"])
    backbone = build_backbone(params.backbone, "none", params.backbone_blocks)  # weights below
    contract = make_contract(read_meta(shards), backbone, params)
    model = Classifier(backbone, len(contract.class_names), params.dropout)
    model.load_state_dict(result.best_state)
    partial = {"reason": reason, "round": name, "epochs_done": len(result.history),
               "phases_done": int(saved["phase"]), "phases": len(params.phases)}
    log.info("best so far: %s's val macro-F1 %.4f after %d epochs (%d of %d phases done)",
             name, result.best_score, len(result.history), saved["phase"], len(params.phases))
    return TrainOutcome(model, contract, result, _no_pseudo_labels(), partial=partial)


def _no_pseudo_labels() -> pd.DataFrame:
    return pd.DataFrame(columns=["round", "unlabeled_row", "label", "confidence"])


def fingerprint_of(params: TrainParams, manifest: Path, shards: Path,
                   synthetic: Path | None = None) -> str:
    """Identity of a training run (params, data, synthetic data, code): see run_fingerprint."""
    inputs: list[Path | dict] = [manifest, read_meta(shards)]
    if synthetic is not None:
        inputs += [read_synthetic_meta(synthetic), synthetic / "train" / "rows.parquet"]
    return run_fingerprint(params, *inputs, code=__name__)


SECTION = "train"
Params = TrainParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cellpipe train``'s options, one per parameter of :func:`run`."""
    add_path(parser, "shards", "preprocess shards folder")
    add_path(parser, "manifest", "manifest.parquet (its hash goes into the checkpoint)")
    add_path(parser, "out", "reports folder: history.csv, curves.png, metrics.json, "
                            "checkpoints/")
    add_path(parser, "model", "checkpoint to write (model.pt)")
    add_path(parser, "synthetic", "the augment stage's synthetic folder; the data gate "
                                  "decides whether its images are used (train.synthetic)",
             required=False)
    add_device(parser)
    parser.add_argument("--export-best", action="store_true",
                        help="train nothing: save the best weights of this run's checkpoints "
                             "(a stopped or killed run) as the model, marked partial")


def run(shards: Path, manifest: Path, out: Path, model: Path, params: TrainParams, *,
        synthetic: Path | None = None, device: str = "auto", export_best: bool = False) -> dict:
    """The stage as DVC runs it: checkpoint to ``model``, reports under ``out``.

    Under ``torchrun`` every rank trains (DDP: see engine/distributed.py) and rank 0
    alone writes; the other ranks wait for it and return its metrics. SIGINT or SIGTERM
    while it trains saves the best weights so far as a partial ``model`` (see
    :func:`best_so_far`), then raises :class:`Interrupted`; ``export_best`` only does
    that saving.
    """
    fingerprint = fingerprint_of(params, manifest, shards, synthetic)
    checkpoints = out / "checkpoints"
    if export_best:
        outcome = best_so_far(shards, params, checkpoints=checkpoints, fingerprint=fingerprint,
                              reason="exported with --export-best")
        if outcome is None:
            raise InputError(f"no finished epoch of this run in {checkpoints} (a checkpoint "
                             "of other params, data or code is not this run's)")
        return _write_outputs(outcome, params, manifest, out, model)
    picked = Device.pick(device)
    with distributed.process_group(picked.torch_device), _stop_on_signals():
        try:
            outcome = train(shards, params, device=picked, checkpoints=checkpoints,
                            fingerprint=fingerprint, synthetic=synthetic)
        except Interrupted as stop:
            if distributed.is_main():
                _save_best_so_far(stop, shards, params, checkpoints, fingerprint, manifest, out,
                                  model)
            raise
        metrics = (_write_outputs(outcome, params, manifest, out, model)
                   if distributed.is_main() else None)
        # Also the other ranks' barrier: they return once rank 0's outputs are on disk.
        return distributed.broadcast_object(metrics)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` meanwhile (Python's default for
    SIGTERM ends the process on the spot, with nothing saved)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a caller's thread keeps its own
        return

    def stop(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():  # None: set outside Python; the default
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _save_best_so_far(stop: Interrupted, shards: Path, params: TrainParams, checkpoints: Path,
                      fingerprint: str, manifest: Path, out: Path, model: Path) -> None:
    """After a stop: the best weights on disk as a partial model, if an epoch ended."""
    outcome = best_so_far(shards, params, checkpoints=checkpoints, fingerprint=fingerprint,
                          reason=str(stop))
    if outcome is None:
        log.warning("%s before the first epoch ended: no model saved", stop)
        return
    _write_outputs(outcome, params, manifest, out, model)
    log.warning("%s: the best weights so far are saved in %s, marked partial; the same "
                "command resumes the run", stop, model)


def _write_outputs(outcome: TrainOutcome, params: TrainParams, manifest: Path, out: Path,
                   model_path: Path) -> dict:
    """Checkpoint, history, curves and metrics of a finished run, or of a stopped one's best
    weights so far (``outcome.partial``); rank 0's job under DDP."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    history = pd.DataFrame.from_records(outcome.result.history)
    # Wall-clock seconds stay out of every tracked file: they differ on each run, and a
    # rerun that reproduces the same weights must leave dvc.lock and git unchanged. (A
    # history read back from a checkpoint has none.)
    seconds = history.pop("seconds").sum() if "seconds" in history else None
    partial = {"partial": outcome.partial} if outcome.partial else {}
    save_model(model_path, outcome.model, outcome.contract, backbone=params.backbone,
               backbone_blocks=params.backbone_blocks, weights=params.weights,
               dropout=params.dropout,
               params=json.loads(params.model_dump_json()), manifest_sha256=manifest_sha,
               val_macro_f1=outcome.result.best_score, data_gate=outcome.gate,
               history=history.to_dict(orient="records"), **partial)
    history.to_csv(out / "history.csv", index=False)
    outcome.pseudo_labels.to_csv(out / "pseudo_labels.csv", index=False)
    training_curves(history, out / "curves.png")
    if outcome.generated is not None:  # a look at what the classifier learnt to reject
        image_gallery(outcome.generated, [""] * len(outcome.generated),
                        out / "sgan_generated.png", title="sgan: generated images")
    best, epoch_in_phase = best_epoch(history)
    metrics = {
        "val_macro_f1": float(best["val_macro_f1"]),
        "val_accuracy": float(best["val_accuracy"]),
        "epochs": len(history),
        "pseudo_labels": len(outcome.pseudo_labels),
        **outcome.gate,
        **partial,
    }
    write_json(out / "metrics.json", metrics)
    where = f"round {int(best['round'])} " if pd.notna(best.get("round")) else ""
    log.info("best val macro-F1 %.4f in %sphase %d epoch %d (%d epochs in all%s); %smodel "
             "saved to %s", metrics["val_macro_f1"], where, best["phase"], epoch_in_phase,
             metrics["epochs"], f", {seconds:.1f} s" if seconds is not None else "",
             "partial " if outcome.partial else "", model_path)
    return metrics


def best_epoch(history: pd.DataFrame) -> tuple[pd.Series, int]:
    """The best epoch's record (the first best, as the loop keeps it) and its number within
    its phase; ``epoch`` counts over all phases of a round."""
    best = history["val_macro_f1"].idxmax()
    rounds = history["round"].fillna(0) if "round" in history else pd.Series(0, history.index)
    same_phase = (rounds == rounds[best]) & (history["phase"] == history.at[best, "phase"])
    return history.loc[best], int(same_phase.loc[:best].sum())
