"""Shared helpers: tests generate every image they read."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
VENV_BIN = Path(sys.executable).parent

# Distinct colours per class, so a test can tell from the pixels which label an image has.
CLASS_COLOURS = {"a": (220, 40, 40), "b": (40, 200, 60), "c": (50, 60, 230)}


def solid(colour: Sequence[int], size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """An H×W×3 uint8 image of one colour, with a little noise so files differ."""
    width, height = size
    rng = np.random.default_rng(abs(hash((tuple(colour), size))) % 2**32)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = colour
    noise = rng.integers(0, 3, size=image.shape, dtype=np.uint8)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def save(path: Path, pixels: np.ndarray, **options) -> Path:
    """Save ``pixels`` with Pillow (format from the suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return path


def unique_image(seed: int, colour: Sequence[int], size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """A noisy image whose bytes differ for each seed (no accidental duplicates)."""
    width, height = size
    rng = np.random.default_rng(seed)
    base = np.empty((height, width, 3), np.int16)
    base[:] = colour
    return np.clip(base + rng.integers(-20, 20, size=base.shape), 0, 255).astype(np.uint8)


def write_voc_slide(root: Path, name: str, objects: Sequence[tuple[str, tuple[int, int, int, int]]],
                    size: tuple[int, int] = (160, 120)) -> None:
    """A VOC slide: a gray JPEG with each object painted in its class colour + its XML."""
    width, height = size
    # Background noise seeded by the name: two slides never share their bytes.
    rng = np.random.default_rng(sum(name.encode()) * 7919 + len(name))
    pixels = rng.integers(185, 215, size=(height, width, 3)).astype(np.uint8)
    for label, (x0, y0, x1, y1) in objects:
        pixels[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = CLASS_COLOURS.get(label, (0, 0, 0))
    save(root / "JPEGImages" / f"{name}.jpg", pixels, quality=95)
    xml_objects = "".join(
        f"<object><name>{label}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for label, (x0, y0, x1, y1) in objects
    )
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{name}.xml").write_text(
        f"<annotation><filename>{name}.jpg</filename><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size>{xml_objects}</annotation>"
    )


@pytest.fixture
def dvc_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for subprocesses: the venv's bin first on PATH, DVC offline."""
    import os

    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def require_executable(name: str) -> str:
    found = shutil.which(name, path=str(VENV_BIN))
    if found is None:
        pytest.fail(f"{name} not found in {VENV_BIN}: run `make venv`")
    return found


def write_shards(root: Path, classes: Sequence[str], per_split: dict[str, int | Sequence[int]],
                 size: int = 16, seed: int = 0) -> Path:
    """A shards folder of noisy class-coloured squares; learnable in a few epochs.

    ``per_split`` gives the images per class of each split, one number for every class
    or one per class.
    """
    import json

    import pandas as pd

    from cellpipe.data.shards import SHARDS_FORMAT, SplitWriter

    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 60), (50, 60, 230), (200, 200, 40)]
    counts = {}
    for split, per_class in per_split.items():
        labels = np.repeat(np.arange(len(classes)), per_class)
        if split == "unlabeled":
            hidden, labels = labels, np.full(len(labels), -1)
        else:
            hidden = labels
        writer = SplitWriter(root / split, len(labels), size)
        for position, label in enumerate(hidden):
            colour = np.array(palette[label], np.int16)
            noise = rng.integers(-60, 60, size=(size, size, 3))
            writer.put(position, np.clip(colour + noise, 0, 255).astype(np.uint8))
        rows = pd.DataFrame({"path": [f"{split}/{i}.png" for i in range(len(labels))],
                             "manifest_row": np.arange(len(labels))})
        counts[split] = writer.finish(rows, labels)
    meta = {"format": SHARDS_FORMAT, "classes": list(classes), "image_size": size,
            "layout": "NHWC", "dtype": "uint8", "color": "RGB", "resize": "pad",
            "pad_value": 0, "resample": "bilinear", "bit_depth_scaling": "percentile",
            "counts": counts}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def train_uninterrupted_and_killed(objective: type, shards: Path, manifest: Path, root: Path,
                                   params, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Run the train stage twice: to the end into root/uninterrupted, and into root/killed
    with a KeyboardInterrupt in ``objective``'s third epoch. Returns (killed, uninterrupted);
    the caller inspects the killed run's checkpoint, then resumes it."""
    from cellpipe.stages import train as train_stage

    uninterrupted, killed = root / "uninterrupted", root / "killed"
    train_stage.run(shards, manifest, uninterrupted, uninterrupted / "model.pt", params,
                    device="cpu")
    calls = {"epochs": 0}
    original = objective.train_epoch

    def crash_in_epoch_three(self, epoch):
        calls["epochs"] += 1
        if calls["epochs"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(objective, "train_epoch", crash_in_epoch_three)
        with pytest.raises(KeyboardInterrupt):
            train_stage.run(shards, manifest, killed, killed / "model.pt", params, device="cpu")
    return killed, uninterrupted


def assert_same_classifier(a: Path, b: Path) -> None:
    """The two runs' saved classifiers have bit-identical weights."""
    import torch

    from cellpipe.engine.checkpoint import load_model

    first, second = (load_model(path / "model.pt").classifier.state_dict() for path in (a, b))
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs after resume"


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A stand-in manifest file for the train stage, which only hashes it."""
    path = tmp_path / "manifest.parquet"
    path.write_bytes(b"stand-in manifest: only its hash is used by train")
    return path
