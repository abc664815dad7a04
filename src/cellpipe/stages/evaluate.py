"""Evaluate stage: score the model on the test split, calibrate it, and draw its errors.

Phases: load (checkpoint → classifier + contract) → infer (val and test logits)
→ calibrate (temperature fitted on val, saved beside the model for export) →
score (test metrics with calibrated probabilities) → save (metrics.json,
per-class table, predictions, confusion matrix, reliability diagram, mistakes).

With ``--source DIR`` instead of ``--shards`` it scores any labelled folder (any layout
ingest reads) as one test set: the ingest and preprocess stages' own functions prepare
it in a temporary folder with the model's contract (classes, crop geometry, size,
resize, 8-bit scaling), and the temperature stored beside the model calibrates it;
nothing is fitted and no calibration file is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.metrics import confusion_matrix
from torch import nn

from cellpipe import plots
from cellpipe.contract import ModelContract
from cellpipe.data.manifest import Manifest, conform, write_rejections
from cellpipe.data.shards import SplitShard, open_split
from cellpipe.engine.checkpoint import load_model
from cellpipe.engine.data import ImageDataset, image_loader
from cellpipe.engine.loop import Device, predict
from cellpipe.engine.metrics import (
    calibration_bins,
    classification_report,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from cellpipe.errors import InputError
from cellpipe.fsutil import write_json
from cellpipe.params import StageParams
from cellpipe.stages.ingest import IngestParams, SplitParams, VocParams, ingest
from cellpipe.stages.options import add_device, add_path, add_workers
from cellpipe.stages.preprocess import PreprocessParams, preprocess

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"  # beside the model: where the stage writes it


class EvaluateParams(StageParams):
    """The ``evaluate:`` section of params.yaml."""

    split: str = "test"
    calibration_bins: int = Field(15, ge=2, le=100)
    gallery_size: int = Field(24, ge=0, le=200)
    batch_size: int = Field(128, ge=1)


SECTION = "evaluate"
Params = EvaluateParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cellpipe evaluate``'s options, one per parameter of :func:`run`."""
    add_path(parser, "model", "checkpoint (model.pt)")
    add_path(parser, "shards", "preprocess shards folder (the pipeline's stage)", required=False)
    add_path(parser, "source", "instead of --shards: a labelled folder (any layout ingest "
                               "reads) to score whole, as one test set", required=False)
    add_path(parser, "out", "reports folder")
    add_path(parser, "calibration", "with --shards: where to write the temperature fitted on "
                                    "val (JSON, beside the model); with --source: the stored "
                                    "temperature to read (default: calibration.json beside "
                                    "the model)", required=False)
    add_device(parser)
    add_workers(parser)


def run(model: Path, out: Path, params: EvaluateParams, *, shards: Path | None = None,
        source: Path | None = None, calibration: Path | None = None, device: str = "auto",
        workers: int = 1) -> dict:
    """The stage as DVC runs it (``shards``): every evaluation output under ``out``, the
    temperature in ``calibration``. With ``source`` instead: see :func:`evaluate_folder`."""
    if (shards is None) == (source is None):
        raise InputError("evaluate takes one of --shards (the pipeline's test split) and "
                         "--source (a labelled folder to score whole)")
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        return evaluate_folder(model, source, out, params, calibration=calibration,
                               device=device, workers=workers)
    if calibration is None:
        raise InputError("evaluate --shards needs --calibration: where to write the "
                         "temperature fitted on val")
    return evaluate(model, shards, out, calibration, params, device=device)


def evaluate(model_path: Path, shards: Path, out: Path, calibration: Path,
             params: EvaluateParams, *, device: str = "auto") -> dict:
    """Write every evaluation output; return the metrics (also in ``out/metrics.json``)."""
    scorer = _Scorer.load(model_path, device, params)
    val = scorer.infer(open_split(shards, "val"), "val")
    temperature = fit_temperature(val.logits, val.labels)
    metrics = scorer.report(scorer.infer(open_split(shards, params.split), params.split),
                            temperature, out)
    write_json(calibration, {"temperature": temperature, "fitted_on": "val",
                             "ece_test_before": metrics["ece"],
                             "ece_test_after": metrics["ece_calibrated"]})
    return metrics


def evaluate_folder(model_path: Path, source: Path, out: Path, params: EvaluateParams, *,
                    calibration: Path | None = None, device: str = "auto",
                    workers: int = 1) -> dict:
    """Score every labelled image of ``source`` as one test set; the same outputs as the
    stage, calibrated with the stored temperature, ``out/rejected.csv`` listing what was
    left out (classes the model does not know among them) and why."""
    scorer = _Scorer.load(model_path, device, params)
    if calibration is not None and not calibration.is_file():
        raise InputError(f"no calibration file at {calibration}")
    temperature, stored = _stored_temperature(calibration or model_path.parent / CALIBRATION_FILE)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".evaluate-", dir=out) as work:
        shards, found = _prepare_folder(source, scorer.contract, Path(work), out, workers)
        test = scorer.infer(open_split(shards, "test"), str(source))
        # The images are memory-mapped from the temporary folder: report before it goes.
        return scorer.report(test, temperature, out,
                             {"source": str(source), "temperature_from": stored, **found})


@dataclass(frozen=True)
class _Scored:
    """One split's logits, labels, manifest rows and images, and its name for the log."""

    name: str
    logits: np.ndarray
    labels: np.ndarray
    rows: pd.DataFrame
    images: np.ndarray


@dataclass(frozen=True)
class _Scorer:
    """The loaded model and where it runs: infers splits, writes the one report."""

    model: nn.Module
    contract: ModelContract
    runner: Device
    params: EvaluateParams

    @classmethod
    def load(cls, model_path: Path, device: str, params: EvaluateParams) -> _Scorer:
        trained = load_model(model_path)
        runner = Device.pick(device)
        return cls(runner.prepare(trained.classifier), trained.contract, runner, params)

    def infer(self, split: SplitShard, name: str) -> _Scored:
        loader = image_loader(ImageDataset(split.images, split.labels), self.contract,
                              batch_size=self.params.batch_size)
        logits, labels = predict(self.model, loader, self.runner, desc=f"evaluate {name}")
        return _Scored(name, logits, labels, split.rows, split.images)

    def report(self, scored: _Scored, temperature: float, out: Path,
               extra: dict | None = None) -> dict:
        """metrics.json, per-class table, predictions and figures of ``scored``."""
        names, params = self.contract.class_names, self.params
        labels = scored.labels
        raw, scaled = softmax(scored.logits), softmax(scored.logits, temperature)
        report = classification_report(labels, scaled, names)
        ece_raw = expected_calibration_error(labels, raw, params.calibration_bins)
        ece_scaled = expected_calibration_error(labels, scaled, params.calibration_bins)
        metrics = {key: report[key] for key in ("accuracy", "balanced_accuracy", "macro_f1",
                                                "roc_auc_ovr_macro", "macro_precision",
                                                "macro_recall", "absent_classes")}
        metrics.update(ece=ece_raw, ece_calibrated=ece_scaled, temperature=temperature,
                       images=int(len(labels)), **(extra or {}), per_class=report["per_class"])
        if report["absent_classes"]:
            log.warning("'%s' holds no image of class %s: every macro average is over the "
                        "%d classes it holds (%s)", scored.name,
                        ", ".join(report["absent_classes"]), len(report["classes_averaged"]),
                        ", ".join(report["classes_averaged"]))
        write_json(out / "metrics.json", metrics)
        _write_tables(out, scored.rows, labels, scaled, names, report)
        _write_figures(out, labels, raw, scaled, scored.images, names, params, ece_raw,
                       ece_scaled)
        log.info("%s: accuracy %.4f, macro-F1 %.4f, ECE %.4f → %.4f after T = %.3f",
                 scored.name, metrics["accuracy"], metrics["macro_f1"], ece_raw, ece_scaled,
                 temperature)
        return metrics


def _stored_temperature(path: Path) -> tuple[float, str]:
    """The temperature the evaluate stage fitted for this model, and where it came from;
    1 (uncalibrated) when there is none, said in the log and the metrics."""
    if not path.is_file():
        log.warning("no stored temperature at %s: probabilities are reported uncalibrated "
                    "(T = 1); pass --calibration with the model's calibration.json", path)
        return 1.0, f"none ({path} not found): uncalibrated"
    return float(json.loads(path.read_text())["temperature"]), str(path)


def _prepare_folder(source: Path, contract: ModelContract, work: Path, out: Path,
                    workers: int) -> tuple[Path, dict]:
    """Ingest and preprocess ``source`` into ``work/shards`` as one test split, with the
    model's contract; write ``out/rejected.csv``; return the shards and what was left out.

    Every labelled image is scored, whatever split the folder's own layout gives it (a
    ``valid/`` or ``test/`` folder, or TRAIN/TEST folders), so point ``source`` at the
    split folder to score one split only.
    """
    geometry = contract.crop_geometry
    found = ingest(source, IngestParams(
        classes=list(contract.class_names),
        voc=VocParams(pad_fraction=geometry.pad_fraction, square=geometry.square,
                      border=geometry.border),
        split=SplitParams(val_fraction=0, test_fraction=0)),
        workers=workers, classes_from="the model's classes")
    rows = found.manifest.rows
    labelled = rows[rows["label"].notna()]
    if len(labelled) < len(rows):
        log.info("%d unlabeled images in %s are not scored", len(rows) - len(labelled), source)
    given = labelled["split"].value_counts()
    if len(given) > 1:
        log.warning("the folder's own splits (%s) are scored together as one test set",
                    ", ".join(f"{split} {count}" for split, count in sorted(given.items())))
    # Written before any failure below, so that the user can read why.
    write_rejections([*found.rejections, *found.hidden], out / "rejected.csv")
    if found.unknown_labels:
        log.warning("not scored, classes the model does not know (it knows %s): %s; listed "
                    "in rejected.csv", ", ".join(contract.class_names),
                    ", ".join(f"{name} ({count})" for name, count in found.unknown_labels.items()))
    if labelled.empty:
        raise InputError(f"{source} holds no labelled image of the model's classes "
                         f"{list(contract.class_names)}"
                         + (f" (found: {sorted(found.unknown_labels)})"
                            if found.unknown_labels else ""))
    manifest = Manifest(conform(labelled.assign(split="test")), found.manifest.classes,
                        found.manifest.crop)
    shards = work / "shards"
    _, failed = preprocess(manifest, source, shards, PreprocessParams(
        image_size=contract.image_size, resize=contract.resize, pad_value=contract.pad_value,
        resample=contract.resample, bit_depth_scaling=contract.bit_depth_scaling),
        workers=workers)
    rejections = [*found.rejections, *failed]
    if failed:
        write_rejections([*rejections, *found.hidden], out / "rejected.csv")
    if rejections:
        log.warning("%d inputs of %s not scored (reasons in %s)", len(rejections), source,
                    out / "rejected.csv")
    return shards, {"unknown_classes": found.unknown_labels, "rejected": len(rejections),
                    "unlabeled": int(len(rows) - len(labelled))}


def _write_tables(out: Path, rows: pd.DataFrame, labels: np.ndarray, probabilities: np.ndarray,
                  names: tuple[str, ...], report: dict) -> None:
    per_class = pd.DataFrame.from_dict(report["per_class"], orient="index")
    per_class.index.name = "class"
    per_class.to_csv(out / "per_class.csv")
    predicted = probabilities.argmax(axis=1)
    predictions = pd.DataFrame({
        "path": rows["path"], "manifest_row": rows["manifest_row"],
        "label": [names[k] for k in labels], "predicted": [names[k] for k in predicted],
        "confidence": probabilities.max(axis=1).round(6),
        **{f"p_{name}": probabilities[:, k].round(6) for k, name in enumerate(names)},
    })
    predictions.to_csv(out / "predictions.csv", index=False)


def _write_figures(out: Path, labels: np.ndarray, raw: np.ndarray, scaled: np.ndarray,
                   images: np.ndarray, names: tuple[str, ...], params: EvaluateParams,
                   ece_raw: float, ece_scaled: float) -> None:
    predicted = scaled.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(names))))
    plots.confusion_matrix(matrix, names, out / "confusion_matrix.png")
    bins = calibration_bins(labels, raw, params.calibration_bins).add_prefix("raw_").join(
        calibration_bins(labels, scaled, params.calibration_bins).add_prefix("scaled_"))
    plots.reliability_diagram(bins, ece_raw, ece_scaled, out / "reliability.png")
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-scaled[wrong].max(axis=1), kind="stable")][:params.gallery_size]
    titles = [f"{names[labels[i]]} → {names[predicted[i]]} {scaled[i].max():.2f}" for i in worst]
    plots.image_gallery(np.asarray(images[worst]), titles, out / "mistakes.png")
