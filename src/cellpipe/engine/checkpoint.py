"""The self-describing model checkpoint: enough to rebuild the classifier from it alone."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from cellpipe import __version__
from cellpipe.codefiles import imported_code
from cellpipe.contract import ModelContract
from cellpipe.errors import InputError
from cellpipe.fsutil import atomic_path
from cellpipe.nets.classifier import Classifier
from cellpipe.nets.registry import build_backbone

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainedModel:
    classifier: Classifier
    contract: ModelContract
    info: dict  # everything else the checkpoint holds (params, history, hashes, scores)


def save_model(path: Path, classifier: Classifier, contract: ModelContract, *, backbone: str,
               weights: str, dropout: float, backbone_blocks: int | None = None,
               **info: object) -> None:
    """Write weights, architecture, contract and provenance (``info``) atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "cellpipe_version": __version__,
        "backbone": backbone,
        "backbone_blocks": backbone_blocks,
        "weights": weights,
        "dropout": dropout,
        "contract": contract.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
        **info,
    }
    save_reproducibly(path, payload)


def save_reproducibly(path: Path, payload: object) -> None:
    """``torch.save`` atomically, with the same bytes for the same payload.

    Saved through a buffer: given a path, torch names the archive's root folder after
    the (random) temporary file, and the same model would hash differently every run.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# Numeric numpy arrays (predictions, numpy's RNG state) rebuild from these alone; an
# object array would still need its elements' classes, which stay refused.
_PLAIN_NUMPY = [np.core.multiarray._reconstruct, np.ndarray, np.dtype,
                *(type(np.dtype(kind)) for kind in "?bBhHiIlLqQefdgFDG")]


class UnsafeCheckpoint(InputError):
    """A checkpoint holds pickled Python objects, which could run code when loaded."""


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's payload, unpickled with ``weights_only=True``.

    cellpipe writes only tensors, numeric numpy arrays and plain data (dicts, lists,
    strings, numbers), so the restricted unpickler reads every checkpoint it made;
    anything else, e.g. a crafted file whose pickle would run code on load, is refused
    with the reason.
    """
    try:
        with torch.serialization.safe_globals(_PLAIN_NUMPY):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = [line.strip() for line in str(error).splitlines()
                   if "GLOBAL" in line or "but got" in line]
        raise UnsafeCheckpoint(f"refusing to load {path}: it holds Python objects other than "
                               f"tensors and plain data, which could run code when loaded"
                               + (f" ({refused[0].split('. ')[0]})" if refused else "")) from None
    if not isinstance(payload, dict):
        raise InputError(f"{path} is not a cellpipe checkpoint (a {type(payload).__name__})")
    return payload


def load_model(path: Path) -> TrainedModel:
    """Rebuild the classifier (in eval mode) from a checkpoint written by :func:`save_model`."""
    if not path.is_file():
        raise InputError(f"no trained model at {path} (run the train stage first)")
    payload = load_checkpoint(path)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {payload.get('format')}, "
                         f"expected {CHECKPOINT_FORMAT}")
    contract = ModelContract.from_dict(payload["contract"])
    # Architecture only: the trained weights come from the checkpoint itself.
    # (Checkpoints from before truncation existed have no backbone_blocks: all blocks.)
    backbone = build_backbone(payload["backbone"], "none", payload.get("backbone_blocks"))
    classifier = Classifier(backbone, len(contract.class_names), payload["dropout"])
    classifier.load_state_dict(payload["state_dict"])
    classifier.eval()
    reserved = {"state_dict", "contract"}
    return TrainedModel(classifier, contract, {k: v for k, v in payload.items()
                                               if k not in reserved})


# --- resumable run state (the classifier loop and the GAN loop) --------------------------


def rng_state(generator: torch.Generator) -> dict:
    """Every random state a training run draws from, to save with its checkpoint."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "loader": generator.get_state()}


def restore_rng(rng: dict, generator: torch.Generator) -> None:
    """Put back the random states saved by :func:`rng_state`."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["loader"])


def save_run_state(path: Path, state: dict, fingerprint: str) -> None:
    """Save a run's resumable ``state`` (weights, optimisers, RNGs, history) atomically.

    Wall-clock seconds stay in memory only: the saved state is a DVC output, and a rerun
    that trains the same weights must write the same bytes.
    """
    history = [{k: v for k, v in record.items() if k != "seconds"}
               for record in state.get("history", [])]
    save_reproducibly(path, {**state, "history": history, "fingerprint": fingerprint})


def load_run_state(path: Path, fingerprint: str) -> dict | None:
    """The saved state if it belongs to this exact run (same params and data), else None."""
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it belongs to other params, data or code", path)
        return None
    return state


def run_fingerprint(params: BaseModel, *inputs: Path | dict, code: str) -> str:
    """Identity of a training run: resume only a checkpoint with the same one.

    It covers the params, the input files (bytes) or descriptions (dicts), and the
    source of module ``code`` (the stage) with every cellpipe module it imports:
    the files dvc.yaml lists as the stage's deps. DVC reruns the stage when they
    change, and a persisted checkpoint from older code must not be resumed then;
    code the stage does not run leaves the fingerprint (and dvc.lock) alone.
    """
    digest = hashlib.sha256(params.model_dump_json().encode())
    for source in imported_code(code):
        digest.update(source.read_bytes())
    for item in inputs:
        if isinstance(item, dict):
            digest.update(json.dumps(item, sort_keys=True).encode())
        else:
            digest.update(hashlib.sha256(item.read_bytes()).digest())
    return digest.hexdigest()
