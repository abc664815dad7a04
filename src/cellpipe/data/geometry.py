"""Boxes around annotated or detected objects, and how they are grown into crops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# How a crop that would leave the image is kept inside it: ``shift`` moves the crop
# into the image (the object sits off-centre); ``fill`` keeps it centred and fills the
# part outside the image (see ``cut``).
BorderRule = Literal["shift", "fill"]


@dataclass(frozen=True)
class Box:
    """Pixel box [x0, x1) × [y0, y1), in image coordinates."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"degenerate box {self.as_tuple()}: needs x1 > x0 and y1 > y0")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


def crop_box(box: Box, image_width: int, image_height: int, *,
             pad_fraction: float, square: bool, border: BorderRule = "shift") -> Box:
    """Grow ``box`` by ``pad_fraction`` of its longer side into a crop box.

    With ``square`` the crop is a square centred on the object, so every object keeps
    its scale and context after the resize to the model's input size. At the image
    border, ``shift`` moves the crop inside the image (when it fits) and ``fill``
    keeps it centred, reaching outside the image; ``cut`` fills that part.
    """
    pad = pad_fraction * max(box.width, box.height)
    if square:
        width = height = max(box.width, box.height) + 2 * pad
    else:
        width, height = box.width + 2 * pad, box.height + 2 * pad
    centre_x, centre_y = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    if border == "fill":
        x0, x1 = _centred_interval(centre_x, width)
        y0, y1 = _centred_interval(centre_y, height)
    else:
        x0, x1 = _fit_interval(centre_x, width, image_width)
        y0, y1 = _fit_interval(centre_y, height, image_height)
    return Box(x0, y0, x1, y1)


@dataclass(frozen=True)
class CropGeometry:
    """How an object's box becomes the crop a model sees (see :func:`crop_box`).

    Ingest crops the training objects with it; it travels in the manifest, the shards'
    description and the model contract, so scoring crops found cells exactly alike.
    """

    pad_fraction: float = 0.15
    square: bool = True
    border: BorderRule = "fill"

    def crop(self, box: Box, image_width: int, image_height: int) -> Box:
        """The crop box of ``box`` in an image of this size."""
        return crop_box(box, image_width, image_height, pad_fraction=self.pad_fraction,
                        square=self.square, border=self.border)


def cut(image: np.ndarray, box: Box, fill: int = 0) -> np.ndarray:
    """The H×W(×C) pixels of ``box``; where it leaves ``image``, they are ``fill``."""
    height, width = image.shape[:2]
    if box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height:
        return image[box.y0:box.y1, box.x0:box.x1]
    out = np.full((box.height, box.width, *image.shape[2:]), fill, dtype=image.dtype)
    x0, y0 = max(box.x0, 0), max(box.y0, 0)
    x1, y1 = min(box.x1, width), min(box.y1, height)
    if x1 > x0 and y1 > y0:
        out[y0 - box.y0:y1 - box.y0, x0 - box.x0:x1 - box.x0] = image[y0:y1, x0:x1]
    return out


def _centred_interval(centre: float, length: float) -> tuple[int, int]:
    """Integer interval of ``length`` (rounded once) around ``centre``, unbounded."""
    size = max(1, round(length))
    low = round(centre - size / 2)
    return low, low + size


def _fit_interval(centre: float, length: float, limit: int) -> tuple[int, int]:
    """Integer interval of ``length`` around ``centre``, shifted (not cut) into [0, limit).

    The length is rounded once, so equal boxes give equal crops wherever they sit;
    an interval longer than the image is cut to the image.
    """
    size = max(1, min(round(length), limit))
    low = round(centre - size / 2)
    low = min(max(low, 0), limit - size)
    return low, low + size
