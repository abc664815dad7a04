"""Cut tissue into a grid of tiles: the `tiles` way of turning a slide into model inputs.

The geometry is a validated dataclass-like params model (tile size, stride, level); the
background is skipped with a tissue mask made once on the slide's overview (Otsu on
saturation: stained tissue is coloured, glass is grey or white).

Tiles are read in batches by a few threads ahead of the batch being classified
(:func:`prefetch_ordered`), a bounded number at a time, so decoding overlaps inference
and memory stays flat however large the slide is.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from pydantic import Field, model_validator
from scipy import ndimage as ndi
from skimage import color, filters, util

from cellpipe.data.geometry import Box
from cellpipe.parallel import default_workers
from cellpipe.params import StageParams
from cellpipe.slides.readers import SlideReader

T = TypeVar("T")
R = TypeVar("R")


class TileParams(StageParams):
    """Tile grid geometry and background skipping (``score.tiles`` in params.yaml)."""

    size: int = Field(224, ge=8, description="tile side in pixels of the level read")
    overlap: int = Field(0, ge=0, description="pixels shared by neighbouring tiles")
    level: int = Field(0, ge=0, description="pyramid level to read (0 = full resolution)")
    min_tissue: float = Field(0.25, ge=0, le=1, description="skip tiles with less tissue")
    min_saturation: float = Field(0.05, ge=0, le=1,
                                  description="tissue is at least this saturated (HSV)")
    overview_size: int = Field(2048, ge=64, description="longest side of the mask's overview")
    read_workers: int | None = Field(None, ge=0,
                                     description="threads decoding the next batches of tiles "
                                                 "while the model classifies one (None or 0: "
                                                 "every core; 1: read in turn, no thread)")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> TileParams:
        if self.overlap >= self.size:
            raise ValueError(f"tile overlap {self.overlap} must be smaller than size {self.size}")
        return self

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    @property
    def decode_threads(self) -> int:
        """Threads reading tiles: ``read_workers``, or every core this process may use."""
        return self.read_workers or default_workers()


def tissue_mask(overview: np.ndarray, min_saturation: float) -> np.ndarray:
    """Boolean mask of tissue on an RGB overview: Otsu on saturation, never below a floor."""
    saturation = hsv_saturation(overview)
    threshold = min_saturation
    if np.ptp(saturation) > 0:
        threshold = max(threshold, float(filters.threshold_otsu(saturation)))
    return ndi.binary_fill_holes(ndi.binary_opening(saturation > threshold, iterations=2))


# HSV saturation of 8-bit pixels by their largest and smallest channel, with the float
# arithmetic of scikit-image's rgb2hsv: a 2048 px overview in tens of milliseconds, not the
# seconds rgb2hsv takes to compute hue and value the mask does not use.
_LEVELS = util.img_as_float(np.arange(256, dtype=np.uint8))
with np.errstate(invalid="ignore", divide="ignore"):
    _SATURATION = (_LEVELS[:, None] - _LEVELS[None, :]) / _LEVELS[:, None]  # [max, min]
_SATURATION[np.arange(256)[:, None] <= np.arange(256)[None, :]] = 0.0  # no spread: grey


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """The S of HSV (``rgb2hsv(rgb)[..., 1]``): (max − min) / max over the channels."""
    if rgb.dtype != np.uint8:
        return color.rgb2hsv(rgb)[..., 1]
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Channel by channel: numpy reduces a short last axis far slower than this.
    return _SATURATION[np.maximum(np.maximum(red, green), blue),
                       np.minimum(np.minimum(red, green), blue)]


def tissue_tiles(reader: SlideReader, params: TileParams, *, page: int = 0) -> list[Box]:
    """Tiles (in ``params.level``'s pixels) whose share of tissue reaches ``min_tissue``."""
    if params.level >= len(reader.level_dimensions):
        raise ValueError(f"tile level {params.level}: the slide has only "
                         f"{len(reader.level_dimensions)} levels")
    overview, scale = reader.overview(params.overview_size, page=page)
    mask = tissue_mask(overview, params.min_saturation)
    to_overview = scale * reader.downsample(params.level)  # overview px per level px
    width, height = reader.level_dimensions[params.level]
    tiles = []
    for y in range(0, max(1, height - params.overlap), params.stride):
        for x in range(0, max(1, width - params.overlap), params.stride):
            tile = Box(x, y, min(x + params.size, width), min(y + params.size, height))
            if _tissue_fraction(mask, tile, to_overview) >= params.min_tissue:
                tiles.append(tile)
    return tiles


def _tissue_fraction(mask: np.ndarray, tile: Box, to_overview: float) -> float:
    x0, y0 = math.floor(tile.x0 * to_overview), math.floor(tile.y0 * to_overview)
    x1 = max(x0 + 1, math.ceil(tile.x1 * to_overview))
    y1 = max(y0 + 1, math.ceil(tile.y1 * to_overview))
    window = mask[y0:y1, x0:x1]
    return float(window.mean()) if window.size else 0.0


def prefetch_ordered(function: Callable[[T], R], items: Iterable[T], *, workers: int,
                     ahead: int) -> Iterator[R]:
    """Yield ``function(item)`` for each item, in input order, computed by ``workers`` threads.

    At most ``ahead`` items are submitted and not yet yielded, so at most ``ahead`` results
    (plus the one the caller holds) sit in memory, whatever the number of items. With one
    worker, each item is computed when asked for, in this thread, as a plain loop would.
    A failure is raised when its item's turn comes, as the plain loop would raise it; the
    items not yet started are then cancelled.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    remaining = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-read") as pool:
        pending: deque[Future[R]] = deque(pool.submit(function, item)
                                          for _, item in zip(range(max(1, ahead)), remaining,
                                                             strict=False))
        try:
            while pending:
                result = pending.popleft().result()
                # Submitted before yielding: the threads read on while the caller works.
                for item in remaining:
                    pending.append(pool.submit(function, item))
                    break
                yield result
        finally:  # the caller stopped early or a read failed: start nothing more
            for future in pending:
                future.cancel()
