"""Export stage: the checkpoint as a calibrated ONNX model, proven equal to PyTorch.

Phases: load (checkpoint + temperature from evaluate) → export (ONNX with the
contract inside) → check (parity with PyTorch on every validation image; the
stage fails and writes nothing when it does not hold) → quantize (optional
dynamic INT8, kept only if validation accuracy drops less than the margin) →
save (model.onnx, card.json, metrics.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from cellpipe.contract import ModelContract, to_model_input
from cellpipe.data.shards import open_split
from cellpipe.engine.checkpoint import load_model
from cellpipe.engine.data import ImageDataset, image_loader
from cellpipe.engine.loop import Device, predict
from cellpipe.engine.metrics import classification_report, softmax
from cellpipe.errors import InputError, StageFailed
from cellpipe.fsutil import file_sha256, write_json
from cellpipe.params import StageParams
from cellpipe.serving.onnx_model import (
    compare,
    export_onnx,
    open_session,
    predict_probabilities,
    quantize_int8,
)
from cellpipe.stages.options import add_path

log = logging.getLogger(__name__)

MODEL_FILE, CARD_FILE, METRICS_FILE = "model.onnx", "card.json", "metrics.json"


class ExportParams(StageParams):
    """The ``export:`` section of params.yaml."""

    opset: int = Field(17, ge=13)
    fold_temperature: bool = True
    parity_tolerance: float = Field(1e-4, gt=0)
    quantize_int8: bool = False
    int8_max_accuracy_drop: float = Field(0.01, ge=0)
    batch_size: int = Field(128, ge=1)


SECTION = "export"
Params = ExportParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cellpipe export``'s options, one per parameter of :func:`run`."""
    add_path(parser, "model", "checkpoint (model.pt)")
    add_path(parser, "calibration", "calibration.json written by evaluate")
    add_path(parser, "shards", "preprocess shards folder")
    add_path(parser, "out", "output folder: model.onnx, card.json, metrics.json")


@dataclass(frozen=True)
class Exported:
    """A checked ONNX model in a work folder, with its card and metrics."""

    onnx: Path
    card: dict
    metrics: dict


def run(model: Path, calibration: Path, shards: Path, out: Path, params: ExportParams) -> dict:
    """The stage as DVC runs it: ``out/model.onnx``, ``card.json`` and ``metrics.json``,
    written only when the export passed its checks."""
    temperature = _temperature(calibration) if params.fold_temperature else 1.0
    val = open_split(shards, "val")
    if len(val.labels) == 0:
        raise InputError(f"{shards}: the val split is empty; parity needs real images")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as work:
        exported = export(model, temperature, np.asarray(val.images),
                          np.asarray(val.labels, dtype=np.int64), Path(work), params)
        # The model goes first: publish checks card["onnx_sha256"] against the file, so a
        # crash between the renames is caught there instead of serving a mismatched card.
        os.replace(exported.onnx, out / MODEL_FILE)
        write_json(out / CARD_FILE, exported.card)
        write_json(out / METRICS_FILE, exported.metrics)
    log.info("exported %s (%s): val accuracy %.4f, macro-F1 %.4f", out / MODEL_FILE,
             exported.card["precision"], exported.metrics["val_accuracy"],
             exported.metrics["val_macro_f1"])
    return exported.metrics


def export(model_path: Path, temperature: float, images: np.ndarray, labels: np.ndarray,
           work: Path, params: ExportParams) -> Exported:
    """Export the checkpoint to ONNX in ``work``, prove it equals PyTorch on ``images``
    (raises :class:`StageFailed` otherwise), and try INT8 when asked."""
    trained = load_model(model_path)
    contract = trained.contract
    if "partial" in trained.info:
        log.warning("%s is the best so far of a stopped training run (%s): its card says so",
                    model_path, trained.info["partial"]["reason"])
    loader = image_loader(ImageDataset(images, labels), contract, batch_size=params.batch_size)
    logits, _ = predict(Device.pick("cpu").prepare(trained.classifier), loader,
                        Device.pick("cpu"), desc="export: PyTorch reference")
    reference = softmax(logits, temperature)
    inputs = to_model_input(images, contract)

    fp32_path = work / "model.fp32.onnx"
    export_onnx(trained.classifier, contract, fp32_path, temperature=temperature,
                opset=params.opset)
    fp32 = predict_probabilities(open_session(fp32_path), contract, inputs,
                                 batch_size=params.batch_size)
    parity = compare(reference, fp32, params.parity_tolerance)
    log.info("parity on %d val images: max |Δp| = %.2e, %d argmax mismatches",
             parity.images, parity.max_abs_difference, parity.argmax_mismatches)
    if not parity.passed:
        raise StageFailed(
            f"ONNX parity failed on {parity.images} val images: max |Δp| "
            f"{parity.max_abs_difference:.2e} (tolerance {parity.tolerance:.0e}), "
            f"{parity.argmax_mismatches} argmax mismatches; nothing was written")
    fp32_scores = _scores(labels, fp32, contract)
    chosen, int8_report = fp32_path, None
    if params.quantize_int8:
        int8_path = work / "model.int8.onnx"
        quantize_int8(fp32_path, int8_path)
        int8 = predict_probabilities(open_session(int8_path), contract, inputs,
                                     batch_size=params.batch_size)
        int8_report = _int8_decision(labels, int8, contract, fp32_scores, params)
        if int8_report["kept"]:
            chosen = int8_path
    served_scores = int8_report["val"] if chosen != fp32_path else fp32_scores
    card = {
        "onnx_sha256": file_sha256(chosen),
        "precision": "int8" if chosen != fp32_path else "fp32",
        "backbone": trained.info["backbone"],
        "contract": contract.to_dict(),
        "temperature": temperature,
        "val": served_scores,
        "parity": {"images": parity.images, "max_abs_difference": parity.max_abs_difference,
                   "argmax_mismatches": parity.argmax_mismatches,
                   "tolerance": parity.tolerance},
        "int8": int8_report,
        "manifest_sha256": trained.info.get("manifest_sha256"),
        "checkpoint_sha256": file_sha256(model_path),
        "train_params": trained.info.get("params"),
        "export_params": json.loads(params.model_dump_json()),
        # A stopped training run's best weights so far (cellpipe train --export-best).
        **({"partial": trained.info["partial"]} if "partial" in trained.info else {}),
    }
    metrics = {"val_accuracy": served_scores["accuracy"],
               "val_macro_f1": served_scores["macro_f1"], "precision": card["precision"],
               "parity_max_abs_difference": parity.max_abs_difference,
               "temperature": temperature,
               "int8_val_accuracy": int8_report["val"]["accuracy"] if int8_report else None}
    return Exported(chosen, card, metrics)


def _temperature(calibration_path: Path) -> float:
    if not calibration_path.is_file():
        raise InputError(f"no calibration at {calibration_path} (run the evaluate stage first, "
                         "or set export.fold_temperature: false)")
    return float(json.loads(calibration_path.read_text())["temperature"])


def _scores(labels: np.ndarray, probabilities: np.ndarray, contract: ModelContract) -> dict:
    report = classification_report(labels, probabilities, contract.class_names)
    return {"images": int(len(labels)), "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"]}


def _int8_decision(labels: np.ndarray, int8: np.ndarray, contract: ModelContract,
                   fp32_scores: dict, params: ExportParams) -> dict:
    scores = _scores(labels, int8, contract)
    drop = fp32_scores["accuracy"] - scores["accuracy"]
    kept = drop < params.int8_max_accuracy_drop
    log.info("INT8: val accuracy %.4f (fp32 %.4f, drop %.4f): %s", scores["accuracy"],
             fp32_scores["accuracy"], drop, "kept" if kept else "discarded")
    return {"val": scores, "accuracy_drop": drop, "max_accuracy_drop":
            params.int8_max_accuracy_drop, "kept": kept}

