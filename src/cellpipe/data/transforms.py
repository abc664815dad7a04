"""Resize decoded RGB images to the model's square input.

Preprocess uses this for training shards; the serving preprocess and the slide
scorer must call the same function so that no resize rule drifts between them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageOps

ResizeMode = Literal["pad", "crop"]
Resample = Literal["nearest", "bilinear", "bicubic", "lanczos"]

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def fit_square(rgb: np.ndarray, size: int, *, mode: ResizeMode = "pad",
               resample: Resample = "bilinear", pad_value: int = 0) -> np.ndarray:
    """Return ``rgb`` (H×W×3 uint8) resized to size×size×3.

    ``pad`` keeps the aspect ratio and fills the border with ``pad_value``;
    ``crop`` fills the square and cuts the centre of the longer side.
    """
    image = Image.fromarray(rgb)
    method = _RESAMPLING[resample]
    if mode == "pad":
        fitted = ImageOps.pad(image, (size, size), method=method, color=(pad_value,) * 3)
    elif mode == "crop":
        fitted = ImageOps.fit(image, (size, size), method=method)
    else:
        raise ValueError(f"unknown resize mode {mode!r}; valid: pad, crop")
    return np.asarray(fitted, dtype=np.uint8)
