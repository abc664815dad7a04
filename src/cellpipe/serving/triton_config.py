"""Triton model configurations generated from the model I/O contract.

Three models are published per classifier (``NAME`` from params):

- ``NAME``: the ONNX classifier (``platform: onnxruntime_onnx``), tensors in,
  calibrated probabilities out, class names from ``labels.txt``;
- ``NAME_preprocess``: a Python-backend model that turns encoded image bytes
  into model inputs with the training evaluation transform;
- ``NAME_images``: an ensemble chaining the two, so clients send files as they are.

Configs are built as Triton's own protobuf messages (from tritonclient) and
written in protobuf text format, so every field name is checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from google.protobuf import text_format
from pydantic import Field
from tritonclient.grpc import model_config_pb2 as pb

from cellpipe.contract import ModelContract
from cellpipe.params import DEFAULT_PARAMS_FILE, StageParams

CONTRACT_PARAMETER = "cellpipe_contract"
BYTES_INPUT = "image_bytes"
LABELS_FILE = "labels.txt"
_FP32 = pb.DataType.Value("TYPE_FP32")
_STRING = pb.DataType.Value("TYPE_STRING")


DEFAULT_MODEL_NAME = "cell_classifier"  # publish.model_name's default: the one place


class ServingParams(StageParams):
    """How Triton serves the model (part of the ``publish:`` section of params.yaml)."""

    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$")
    max_batch_size: int = Field(64, ge=1)
    max_queue_delay_us: int = Field(2000, ge=0)
    # KIND_GPU in production (NVIDIA's container, native onnxruntime backend); KIND_CPU here.
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"
    # One single-threaded onnxruntime instance per core of the serving machine (2 here):
    # concurrent requests use every core, and no instance's idle threads spin on cores
    # that `cellpipe score`'s worker processes need. One instance with a thread per core
    # made scoring with 2 workers on the same 2 cores ~20% slower (bench/README.md).
    instance_count: int = Field(2, ge=1)
    onnx_threads: int = Field(1, ge=0)  # onnxruntime intra-op threads; 0 = every core
    warmup: bool = True


def published_model_name(params_file: Path = DEFAULT_PARAMS_FILE) -> str:
    """The name the model is published under: ``publish.model_name`` of ``params_file``
    (its default where the file or the key is missing), for clients that score on it."""
    if not params_file.is_file():
        return DEFAULT_MODEL_NAME
    section = (yaml.safe_load(params_file.read_text()) or {}).get("publish") or {}
    serving = {key: value for key, value in section.items() if key in ServingParams.model_fields}
    return ServingParams.model_validate(serving).model_name


def names(params: ServingParams) -> tuple[str, str, str]:
    """(classifier, preprocess, ensemble) model names."""
    return params.model_name, f"{params.model_name}_preprocess", f"{params.model_name}_images"


def classifier_config(contract: ModelContract, params: ServingParams) -> pb.ModelConfig:
    """The ONNX classifier: contract input → calibrated logits and probabilities."""
    classes = len(contract.class_names)
    config = pb.ModelConfig(
        name=params.model_name, platform="onnxruntime_onnx",
        max_batch_size=params.max_batch_size, default_model_filename="model.onnx",
        input=[pb.ModelInput(name=contract.input_name, data_type=_FP32,
                             dims=list(contract.input_shape))],
        output=[pb.ModelOutput(name=contract.output_name, data_type=_FP32, dims=[classes]),
                pb.ModelOutput(name=contract.probabilities_name, data_type=_FP32,
                               dims=[classes], label_filename=LABELS_FILE)],
    )
    _add_serving_options(config, contract, params)
    config.parameters["intra_op_thread_count"].string_value = str(params.onnx_threads)
    if params.warmup:
        warmup = config.model_warmup.add(name="zeros", batch_size=1)
        warmup.inputs[contract.input_name].CopyFrom(pb.ModelWarmup.Input(
            data_type=_FP32, dims=list(contract.input_shape), zero_data=True))
    return config


def preprocess_config(contract: ModelContract, params: ServingParams) -> pb.ModelConfig:
    """The Python-backend preprocess: encoded image bytes → contract input tensor."""
    _, preprocess, _ = names(params)
    config = pb.ModelConfig(
        name=preprocess, backend="python", max_batch_size=params.max_batch_size,
        input=[pb.ModelInput(name=BYTES_INPUT, data_type=_STRING, dims=[1])],
        output=[pb.ModelOutput(name=contract.input_name, data_type=_FP32,
                               dims=list(contract.input_shape))],
    )
    _add_serving_options(config, contract, params, kind="KIND_CPU")  # decoding is CPU work
    return config


def ensemble_config(contract: ModelContract, params: ServingParams) -> pb.ModelConfig:
    """Encoded image bytes in, calibrated class probabilities (with labels) out."""
    classifier, preprocess, ensemble = names(params)
    config = pb.ModelConfig(
        name=ensemble, platform="ensemble", max_batch_size=params.max_batch_size,
        input=[pb.ModelInput(name=BYTES_INPUT, data_type=_STRING, dims=[1])],
        output=[pb.ModelOutput(name=contract.probabilities_name, data_type=_FP32,
                               dims=[len(contract.class_names)], label_filename=LABELS_FILE)],
    )
    config.parameters[CONTRACT_PARAMETER].string_value = contract_json(contract)
    steps = config.ensemble_scheduling.step
    first = steps.add(model_name=preprocess, model_version=-1)
    first.input_map[BYTES_INPUT] = BYTES_INPUT
    first.output_map[contract.input_name] = "preprocessed_image"
    second = steps.add(model_name=classifier, model_version=-1)
    second.input_map[contract.input_name] = "preprocessed_image"
    second.output_map[contract.probabilities_name] = contract.probabilities_name
    return config


def labels_text(contract: ModelContract) -> str:
    """labels.txt: one class name per line, in output index order."""
    return "".join(f"{name}\n" for name in contract.class_names)


def contract_json(contract: ModelContract) -> str:
    """The canonical JSON of a contract, as stored in configs and compared by clients."""
    return json.dumps(contract.to_dict(), sort_keys=True)


def to_text(config: pb.ModelConfig) -> str:
    """config.pbtxt content."""
    return text_format.MessageToString(config)


def _add_serving_options(config: pb.ModelConfig, contract: ModelContract,
                         params: ServingParams, *, kind: str | None = None) -> None:
    """Batching, instances, version policy and the contract: shared by the real models."""
    config.version_policy.latest.num_versions = 1
    config.dynamic_batching.max_queue_delay_microseconds = params.max_queue_delay_us
    config.instance_group.add(count=params.instance_count,
                              kind=pb.ModelInstanceGroup.Kind.Value(kind or params.instance_kind))
    config.parameters[CONTRACT_PARAMETER].string_value = contract_json(contract)
