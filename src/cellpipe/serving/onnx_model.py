"""The ONNX form of a trained classifier: export, checks, INT8 quantization, local runs.

The exported graph takes the contract's input tensor (float32 N×3×S×S, dynamic
batch) and returns two outputs: calibrated logits (divided by the temperature
fitted in evaluate) and their softmax, the class probabilities a server returns.
The contract itself travels inside the file as metadata, so an ONNX file alone
says how to feed it.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cellpipe.contract import ModelContract
from cellpipe.errors import InputError

log = logging.getLogger(__name__)

CONTRACT_METADATA_KEY = "cellpipe.contract"


class CalibratedClassifier(nn.Module):
    """A classifier with its temperature folded in: image → (logits / T, softmax)."""

    def __init__(self, classifier: nn.Module, temperature: float) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(image) / self.temperature
        return logits, torch.softmax(logits, dim=1)


def export_onnx(classifier: nn.Module, contract: ModelContract, path: Path, *,
                temperature: float = 1.0, opset: int = 17) -> None:
    """Write ``classifier`` (calibrated by ``temperature``) as ONNX with the contract inside."""
    served = CalibratedClassifier(classifier, temperature).eval()
    example = torch.zeros(2, *contract.input_shape)
    names = [contract.input_name, contract.output_name, contract.probabilities_name]
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False: the TorchScript exporter is fast here and needs no onnxscript
        # (DESIGN.md); its deprecation notice is known and not actionable per run.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(served, (example,), str(path), input_names=names[:1],
                          output_names=names[1:], opset_version=opset,
                          dynamic_axes={name: {0: "batch"} for name in names}, dynamo=False)
    model = onnx.load(str(path))
    _set_contract(model, contract)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic INT8 quantization (weights int8, activations quantized on the fly) for CPUs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    contract = read_contract(source)
    # The quantizer logs a line per tensor through the root logger; keep only warnings.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    model = onnx.load(str(target))
    _set_contract(model, contract)  # quantization does not promise to keep metadata
    onnx.save(model, str(target))


def read_contract(path: Path) -> ModelContract:
    """The contract stored in an ONNX file written by :func:`export_onnx`."""
    model = _load_checked(path)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    if CONTRACT_METADATA_KEY not in metadata:
        raise InputError(f"{path}: no cellpipe contract in the ONNX metadata "
                         "(was it written by `cellpipe export`?)")
    return ModelContract.from_dict(json.loads(metadata[CONTRACT_METADATA_KEY]))


def open_session(path: Path, *, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``threads`` = 0 lets onnxruntime use every core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict_probabilities(session: ort.InferenceSession, contract: ModelContract,
                          inputs: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N×K) for float32 model inputs (N×3×S×S), in batches."""
    outputs = [session.run([contract.probabilities_name],
                           {contract.input_name: inputs[start:start + batch_size]})[0]
               for start in range(0, len(inputs), batch_size)]
    if not outputs:
        return np.zeros((0, len(contract.class_names)), np.float32)
    return np.concatenate(outputs)


def validate_onnx(path: Path, contract: ModelContract) -> None:
    """Prove that ``path`` is a complete ONNX model that honours ``contract``.

    Raises :class:`InputError` for a corrupt or truncated file, a file without
    the contract, a different contract, or outputs of the wrong shape. Publish
    calls this before anything reaches a model repository.
    """
    stored = read_contract(path)
    if stored != contract:
        raise InputError(f"{path}: its embedded contract differs from the model card's")
    try:
        session = open_session(path, threads=1)
        batch = np.zeros((2, *contract.input_shape), np.float32)
        logits, probabilities = session.run(
            [contract.output_name, contract.probabilities_name], {contract.input_name: batch})
    except Exception as error:  # onnxruntime raises its own exception types
        raise InputError(f"{path}: onnxruntime cannot run it: {error}") from error
    expected = (2, len(contract.class_names))
    if logits.shape != expected or probabilities.shape != expected:
        raise InputError(f"{path}: outputs {logits.shape}/{probabilities.shape}, "
                         f"expected {expected}")


@dataclass(frozen=True)
class Parity:
    """How closely the ONNX model reproduces PyTorch on the same inputs."""

    images: int
    max_abs_difference: float
    argmax_mismatches: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_difference <= self.tolerance and self.argmax_mismatches == 0


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> Parity:
    """Parity of two N×K probability arrays."""
    return Parity(images=len(reference),
                  max_abs_difference=float(np.abs(reference - candidate).max(initial=0.0)),
                  argmax_mismatches=int((reference.argmax(1) != candidate.argmax(1)).sum()),
                  tolerance=tolerance)


def _set_contract(model: onnx.ModelProto, contract: ModelContract) -> None:
    props = {prop.key: prop.value for prop in model.metadata_props}
    props[CONTRACT_METADATA_KEY] = json.dumps(contract.to_dict(), sort_keys=True)
    onnx.helper.set_model_props(model, props)  # replaces the list, so no duplicate keys


def _load_checked(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise InputError(f"no ONNX model at {path} (run the export stage first)")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as error:  # protobuf DecodeError, onnx ValidationError, …
        raise InputError(f"{path}: not a valid ONNX model: {type(error).__name__}: "
                         f"{error}") from error
    return model
