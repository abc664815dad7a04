"""Contact sheets: a picture of what a stage produced, one row per class."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cellpipe.fsutil import atomic_path

_LABEL_WIDTH = 110
_GAP = 2


def contact_sheet(samples: Mapping[str, np.ndarray], path: Path, *, tile: int = 64) -> None:
    """Save a PNG with one row per class: its name, then its sample images (N×H×W×3)."""
    columns = max((len(images) for images in samples.values()), default=0)
    width = _LABEL_WIDTH + columns * (tile + _GAP)
    height = max(1, len(samples)) * (tile + _GAP)
    sheet = Image.new("RGB", (max(width, _LABEL_WIDTH), height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (name, images) in enumerate(samples.items()):
        top = row * (tile + _GAP)
        draw.text((4, top + tile // 2 - 6), name, fill="black", font=font)
        for column, image in enumerate(images):
            thumb = Image.fromarray(np.asarray(image)).resize((tile, tile))
            sheet.paste(thumb, (_LABEL_WIDTH + column * (tile + _GAP), top))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
