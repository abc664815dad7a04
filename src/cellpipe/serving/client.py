"""Score images on a Triton server over gRPC or HTTP (tritonclient).

Batches go out concurrently (one tritonclient per worker thread), each with a
timeout; connection failures are retried with exponential backoff. Before the
first request the client reads the model's config from the server and compares
the contract stored there with the local one, so a server that would normalise,
resize or name classes differently is refused instead of silently mis-scored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Literal

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellpipe.contract import ModelContract, to_model_input
from cellpipe.errors import CellpipeError
from cellpipe.serving.triton_config import BYTES_INPUT, CONTRACT_PARAMETER, DEFAULT_MODEL_NAME

log = logging.getLogger(__name__)

Protocol = Literal["grpc", "http"]
# gRPC statuses worth another try: the server is (re)starting or a deadline passed.
_RETRYABLE_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}


class ModelUnavailable(CellpipeError):
    """The server does not serve the requested model or version."""


class ContractMismatch(CellpipeError):
    """The served model expects other inputs than the local contract describes."""


class TritonClassifier:
    """Classify batches of images with one model on one Triton server."""

    def __init__(self, url: str, *, protocol: Protocol = "grpc",
                 model_name: str = DEFAULT_MODEL_NAME, model_version: str = "",
                 batch_size: int = 64, concurrency: int = 4, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
        self.url, self.protocol = url, protocol
        self.model_name, self.model_version = model_name, model_version
        self.batch_size, self.concurrency = batch_size, concurrency
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="triton-client")
        self._contract: ModelContract | None = None

    # --- model checks ----------------------------------------------------------------

    @property
    def contract(self) -> ModelContract:
        """The served model's contract (read once from its config on the server)."""
        if self._contract is None:
            self._contract = self._fetch_contract(self.model_name)
        return self._contract

    def pin_served_version(self) -> str:
        """Fix the version this client scores with to the one the server serves now.

        Results are keyed by model version; pinning it keeps one batch on one version
        even if a publish swaps the served version half-way.
        """
        if not self.model_version:
            client = self._client()
            metadata = self._with_retries(lambda: client.get_model_metadata(
                self.model_name, **({"as_json": True} if self.protocol == "grpc" else {})))
            versions = sorted(metadata.get("versions", []), key=int)
            if not versions:
                raise ModelUnavailable(f"{self.url} serves no version of {self.model_name!r}")
            self.model_version = versions[-1]
            self._contract = None  # re-read for exactly this version
        return self.model_version

    def check_contract(self, local: ModelContract) -> None:
        """Raise :class:`ContractMismatch` naming every field where server and local differ."""
        served = self.contract
        differences = [f"{field.name}: server {getattr(served, field.name)!r}, "
                       f"local {getattr(local, field.name)!r}"
                       for field in fields(ModelContract)
                       if getattr(served, field.name) != getattr(local, field.name)]
        if differences:
            raise ContractMismatch(f"{self.model_name} on {self.url} differs from the local "
                                   "model contract: " + "; ".join(differences))

    # --- scoring ---------------------------------------------------------------------

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×S×S×3 images (already fitted to the model's size) → N×K probabilities."""
        return self.classify_tensors(to_model_input(images, self.contract))

    def classify_tensors(self, inputs: np.ndarray) -> np.ndarray:
        """float32 model inputs N×3×S×S → N×K calibrated probabilities."""
        contract = self.contract
        if inputs.shape[1:] != contract.input_shape:
            raise ContractMismatch(f"inputs of shape {inputs.shape[1:]}, the served model "
                                   f"takes {contract.input_shape}")
        return self._score(self.model_name, inputs.astype(np.float32, copy=False),
                           contract.input_name, "FP32")

    def classify_encoded(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded image files (PNG, JPEG, TIFF…) → probabilities, preprocessed by the server."""
        name = f"{self.model_name}_images"
        self._fetch_contract(name)  # fails early and clearly if the ensemble is missing
        blobs = np.empty((len(encoded), 1), dtype=object)
        blobs[:, 0] = list(encoded)
        return self._score(name, blobs, BYTES_INPUT, "BYTES")

    def close(self) -> None:
        """Close every connection (a server waits for open HTTP connections when stopping)."""
        self._pool.shutdown(wait=True)
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    def __enter__(self) -> TritonClassifier:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------

    def _score(self, model: str, data: np.ndarray, input_name: str, datatype: str) -> np.ndarray:
        output = self.contract.probabilities_name
        batches = [data[start:start + self.batch_size]
                   for start in range(0, len(data), self.batch_size)]
        if not batches:
            return np.zeros((0, len(self.contract.class_names)), np.float32)

        def one(batch: np.ndarray) -> np.ndarray:
            return self._with_retries(lambda: self._infer(model, batch, input_name, datatype,
                                                          output))

        return np.concatenate(list(self._pool.map(one, batches)))

    def _infer(self, model: str, batch: np.ndarray, input_name: str, datatype: str,
               output: str) -> np.ndarray:
        module = grpcclient if self.protocol == "grpc" else httpclient
        tensor = module.InferInput(input_name, list(batch.shape), datatype)
        tensor.set_data_from_numpy(batch)
        requested = [module.InferRequestedOutput(output)]
        client = self._client()
        if self.protocol == "grpc":
            result = client.infer(model, [tensor], model_version=self.model_version,
                                  outputs=requested, client_timeout=self.timeout_s)
        else:
            result = client.infer(model, [tensor], model_version=self.model_version,
                                  outputs=requested)
        return result.as_numpy(output)

    def _with_retries(self, call: Callable[[], np.ndarray]) -> np.ndarray:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as error:
                if not self._retryable(error) or attempt == self.retries:
                    raise self._explain(error) from error
                delay = self.backoff_s * 2 ** attempt
                log.warning("Triton %s: %s; retry %d/%d in %.1f s", self.url, error,
                            attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _retryable(self, error: Exception) -> bool:
        if isinstance(error, InferenceServerException):
            return str(error.status()) in _RETRYABLE_GRPC
        return isinstance(error, OSError)  # refused, reset, timed out (HTTP)

    def _explain(self, error: Exception) -> Exception:
        message = str(error)
        if "unknown model" in message or "is not found" in message or "not ready" in message:
            return ModelUnavailable(f"{self.url}: {message.strip()} (published models: "
                                    f"{self._served_models()})")
        if self._retryable(error):
            return CellpipeError(f"Triton at {self.url} ({self.protocol}) failed after "
                                 f"{self.retries} retries: {message.strip()}")
        if isinstance(error, InferenceServerException):
            return CellpipeError(f"Triton at {self.url} ({self.protocol}): {message.strip()}")
        return error

    def _fetch_contract(self, model: str) -> ModelContract:
        client = self._client()
        version = self.model_version
        try:
            ready = self._with_retries(lambda: client.is_model_ready(model, version))
        except ModelUnavailable:
            ready = False
        if not ready:
            raise ModelUnavailable(
                f"{self.url} serves no ready model {model!r}"
                f"{f' version {version}' if version else ''} (models: {self._served_models()})")
        if self.protocol == "grpc":
            config = client.get_model_config(model, version, as_json=True)["config"]
        else:
            config = client.get_model_config(model, version)
        parameters = config.get("parameters", {})
        if CONTRACT_PARAMETER not in parameters:
            raise ContractMismatch(f"{model} on {self.url} has no {CONTRACT_PARAMETER} "
                                   "parameter (not published by cellpipe)")
        return ModelContract.from_dict(json.loads(
            parameters[CONTRACT_PARAMETER]["string_value"]))

    def _served_models(self) -> str:
        try:
            if self.protocol == "grpc":
                index = self._client().get_model_repository_index(as_json=True).get("models", [])
            else:
                index = self._client().get_model_repository_index()
        except Exception:  # the index is only decoration for an error message
            return "unknown"
        return ", ".join(f"{m['name']} v{m.get('version', '?')} {m.get('state', '?')}"
                         for m in index) or "none"

    def _client(self) -> grpcclient.InferenceServerClient | httpclient.InferenceServerClient:
        """This thread's client: HTTP clients must not be shared between threads."""
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = grpcclient.InferenceServerClient(self.url)
            else:
                client = httpclient.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

