"""Generated slides with known contents, and a colour-rule classifier for batch tests.

The smear generator draws pale background, pink red cells and white cells (a purple
nucleus in pale cytoplasm) at known positions, with the colours of a Wright-stained
smear, so the cell finder can be checked against ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cellpipe.contract import ModelContract

BACKGROUND = (205, 208, 212)
RED_CELL = (205, 150, 150)
CYTOPLASM = (200, 180, 215)
NUCLEUS = (110, 90, 190)
PLATELET = (130, 100, 185)


def smear(size: tuple[int, int], *, diameter: int = 40, red: int = 20, white: int = 2,
          seed: int = 0) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """An RGB smear and its cells as (kind, centre x, centre y); cells do not overlap."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    cells: list[tuple[str, float, float]] = []
    kinds = ["WBC"] * white + ["RBC"] * red
    for kind in kinds:
        radius = diameter * (0.75 if kind == "WBC" else 0.5)
        for _ in range(500):  # rejection sampling of a free spot
            x = rng.uniform(radius + 2, width - radius - 2)
            y = rng.uniform(radius + 2, height - radius - 2)
            if all(np.hypot(x - cx, y - cy) > radius + _radius(k, diameter) + 3
                   for k, cx, cy in cells):
                break
        else:
            continue
        box = [x - radius, y - radius, x + radius, y + radius]
        if kind == "RBC":
            draw.ellipse(box, fill=RED_CELL)
        else:
            draw.ellipse(box, fill=CYTOPLASM)
            r = radius * 0.55
            draw.ellipse([x - r, y - r, x + r, y + r], fill=NUCLEUS)
        cells.append((kind, x, y))
    blurred = image.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.normal(0, 4, (height, width, 3))
    return np.clip(np.asarray(blurred) + noise, 0, 255).astype(np.uint8), cells


def _radius(kind: str, diameter: int) -> float:
    return diameter * (0.75 if kind == "WBC" else 0.5)


def write_smear(path: Path, seed: int, size: tuple[int, int] = (320, 240)) -> None:
    Image.fromarray(smear(size, seed=seed)[0]).save(path)


def smear_inbox(root: Path, slides: int) -> Path:
    """``root/inbox`` holding ``slides`` generated smears, slide_00.png, slide_01.png…"""
    inbox = root / "inbox"
    inbox.mkdir()
    for index in range(slides):
        write_smear(inbox / f"slide_{index:02d}.png", seed=index)
    return inbox


class ColourRuleClassifier:
    """Classifies fitted crops by colour: bluish → WBC, pink → RBC, else Platelets.

    A stand-in for the served model in batch tests, so they test the batch (resume,
    quarantine, writing) rather than a network. ``delay_s`` slows it down so a test can
    kill a run half-way.
    """

    model_name = "colour_rules"
    model_version = "1"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.contract = ModelContract(class_names=("RBC", "WBC", "Platelets"), image_size=16,
                                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.delay_s = delay_s

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        mean = images.reshape(len(images), -1, 3).mean(1)
        blue = mean[:, 2] - mean[:, 0]
        scores = np.stack([-blue, blue - 10, np.full(len(images), -5.0)], axis=1)
        exp = np.exp(scores - scores.max(1, keepdims=True))
        return (exp / exp.sum(1, keepdims=True)).astype(np.float32)
