"""Evaluate stage: score the model on the test split, calibrate it, and draw its errors.

Phases: load (checkpoint → classifier + contract) → infer (val and test logits)
→ calibrate (temperature fitted on val, saved beside the model for export) →
score (test metrics with calibrated probabilities) → save (metrics.json,
per-class table, predictions, confusion matrix, reliability diagram, mistakes).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.metrics import confusion_matrix

from cellpipe import plots
from cellpipe.data.shards import open_split
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
from cellpipe.fsutil import write_json
from cellpipe.params import StageParams
from cellpipe.stages.options import add_device, add_path

log = logging.getLogger(__name__)


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
    add_path(parser, "shards", "preprocess shards folder")
    add_path(parser, "out", "reports folder")
    add_path(parser, "calibration", "where to write the fitted temperature (JSON, beside the "
                                    "model)")
    add_device(parser)


def run(model: Path, shards: Path, out: Path, calibration: Path, params: EvaluateParams, *,
        device: str = "auto") -> dict:
    """The stage as DVC runs it: every evaluation output under ``out``, the temperature in
    ``calibration``."""
    out.mkdir(parents=True, exist_ok=True)
    return evaluate(model, shards, out, calibration, params, device=device)


def evaluate(model_path: Path, shards: Path, out: Path, calibration: Path,
             params: EvaluateParams, *, device: str = "auto") -> dict:
    """Write every evaluation output; return the metrics (also in ``out/metrics.json``)."""
    trained = load_model(model_path)
    contract, names = trained.contract, trained.contract.class_names
    runner = Device.pick(device)
    model = runner.prepare(trained.classifier)

    def logits_of(split_name: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, np.ndarray]:
        split = open_split(shards, split_name)
        loader = image_loader(ImageDataset(split.images, split.labels), contract,
                              batch_size=params.batch_size)
        logits, labels = predict(model, loader, runner, desc=f"evaluate {split_name}")
        return logits, labels, split.rows, split.images

    val_logits, val_labels, _, _ = logits_of("val")
    temperature = fit_temperature(val_logits, val_labels)
    logits, labels, rows, images = logits_of(params.split)
    raw, scaled = softmax(logits), softmax(logits, temperature)

    report = classification_report(labels, scaled, names)
    ece_raw = expected_calibration_error(labels, raw, params.calibration_bins)
    ece_scaled = expected_calibration_error(labels, scaled, params.calibration_bins)
    metrics = {key: report[key] for key in ("accuracy", "balanced_accuracy", "macro_f1",
                                            "roc_auc_ovr_macro")}
    metrics.update(ece=ece_raw, ece_calibrated=ece_scaled, temperature=temperature,
                   images=int(len(labels)), per_class=report["per_class"])
    write_json(out / "metrics.json", metrics)
    write_json(calibration, {"temperature": temperature, "fitted_on": "val",
                             "ece_test_before": ece_raw, "ece_test_after": ece_scaled})
    _write_tables(out, rows, labels, scaled, names, report)
    _write_figures(out, labels, raw, scaled, images, names, params, ece_raw, ece_scaled)
    log.info("%s: accuracy %.4f, macro-F1 %.4f, ECE %.4f → %.4f after T = %.3f",
             params.split, metrics["accuracy"], metrics["macro_f1"], ece_raw, ece_scaled,
             temperature)
    return metrics


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
