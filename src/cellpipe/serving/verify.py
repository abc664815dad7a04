"""Check a server end to end: the same images through Triton and through onnxruntime here."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from cellpipe.contract import to_model_input
from cellpipe.data.shards import open_split
from cellpipe.engine.metrics import classification_report
from cellpipe.serving.client import Protocol, TritonClassifier
from cellpipe.serving.onnx_model import open_session, predict_probabilities, read_contract

log = logging.getLogger(__name__)


def verify_server(onnx_path: Path, shards: Path, split: str, url: str, protocol: Protocol, *,
                  model_name: str, limit: int | None = None) -> dict:
    """Score a shard split on the server (tensors and PNG bytes) and in-process; compare.

    Returns the largest probability difference of each path against
    onnxruntime in-process, and the accuracy of the served answers.
    """
    contract = read_contract(onnx_path)
    data = open_split(shards, split)
    images = np.asarray(data.images[:limit])
    labels = np.asarray(data.labels[:limit], dtype=np.int64)
    local = predict_probabilities(open_session(onnx_path), contract,
                                  to_model_input(images, contract))
    with TritonClassifier(url, protocol=protocol, model_name=model_name) as client:
        client.check_contract(contract)
        tensors = client.classify_images(images)
        encoded = client.classify_encoded([_png(image) for image in images])
    labelled = labels >= 0
    report = classification_report(labels[labelled], tensors[labelled], contract.class_names)
    return {"images": int(len(images)), "protocol": protocol,
            "tensor_max_abs_difference": float(np.abs(tensors - local).max(initial=0.0)),
            "bytes_max_abs_difference": float(np.abs(encoded - local).max(initial=0.0)),
            "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
