"""Find the cells of a stained smear: the `cells` way of cutting a slide into model inputs.

Two masks, because a Romanowsky/Wright-Giemsa smear holds two kinds of object:

* **stained objects** (white-cell nuclei, platelets): the haematoxylin-like channel of a
  colour deconvolution (scikit-image's ``rgb2hed``), thresholded with Otsu but never below
  ``min_stain`` so a field without any nucleus does not turn its noise into objects. The
  lobes of one segmented nucleus are joined by a closing, so one white cell is one object;
  its box is then grown to take in the cytoplasm around the nucleus.
* **unstained cells** (red cells): everything redder than the grey-blue background (Otsu
  on CIELAB a*), minus the stained objects' cells, split where
  cells touch by a watershed on the distance transform.

Every object becomes a box; what it *is* is the classifier's job. Sizes are relative to
``cell_diameter``, the typical red-cell diameter in pixels at the resolution read, so one
set of params serves a scanner at any magnification once that number is set.

Every step is the fast implementation of the same arithmetic, so the answers are those of
the scikit-image/scipy reference (tests/test_cells.py), at a fraction of the time: the two
colour channels through lookup tables of the 256 levels of 8-bit slides, binary morphology
and the distance transform in OpenCV, the convex hull only where a shape could be ragged.
On all 364 BCCD slides every box is unchanged (measured against the reference code).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from pydantic import Field
from scipy import ndimage as ndi
from skimage import color, filters, measure, morphology, segmentation, util
from skimage.color.colorconv import xyz_from_rgb, xyz_tristimulus_values
from skimage.feature import peak_local_max

from cellpipe.data.geometry import Box
from cellpipe.params import StageParams

if TYPE_CHECKING:
    from skimage.measure._regionprops import RegionProperties


class CellFinderParams(StageParams):
    """How cells are found on a smear (``score.cells`` in params.yaml)."""

    cell_diameter: float = Field(90, gt=4, description="typical red-cell diameter, px")
    min_stain: float = Field(0.04, ge=0, description="lowest haematoxylin threshold (rgb2hed)")
    min_area: float = Field(0.03, gt=0, description="stained debris below this × a cell's area")
    min_red_area: float = Field(0.25, gt=0,
                                description="unstained debris below this × a cell's area")
    max_area: float = Field(6.0, gt=0, description="clumps above this × a cell's area")
    min_solidity: float = Field(0.6, ge=0, le=1, description="ragged shapes below are debris")
    nucleus_join: float = Field(0.12, ge=0, description="closing radius joining lobes, × diameter")
    nucleus_margin: float = Field(0.25, ge=0, description="cytoplasm around a nucleus, × its size")
    split_distance: float = Field(0.35, gt=0,
                                  description="closest centres of touching cells, × diameter")


@dataclass(frozen=True)
class FoundCell:
    """One object on the smear: its box and where it came from."""

    box: Box
    source: str  # "stained" (nucleus or platelet) | "unstained" (red-cell mask)
    area: int    # pixels of its mask


def find_cells(rgb: np.ndarray, params: CellFinderParams) -> list[FoundCell]:
    """Boxes of every cell-like object in an H×W×3 uint8 field, stained objects first."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"find_cells needs an H×W×3 image, got shape {rgb.shape}")
    cell_area = math.pi * (params.cell_diameter / 2) ** 2
    stained_mask = _stained_mask(rgb, params)
    stained = _stained_objects(stained_mask, rgb.shape[:2], params, cell_area)
    unstained = _unstained_objects(rgb, stained_mask, params, cell_area)
    return stained + unstained


# --- stained objects ---------------------------------------------------------------------


def _stained_mask(rgb: np.ndarray, params: CellFinderParams) -> np.ndarray:
    haematoxylin = haematoxylin_channel(rgb)
    threshold = max(_otsu(haematoxylin), params.min_stain)
    mask = haematoxylin > threshold
    join = round(params.nucleus_join * params.cell_diameter)
    if join:
        mask = _erode(_dilate(mask, join), join)  # a closing; outside the image is empty
    return _fill_holes(mask)


def _stained_objects(mask: np.ndarray, shape: tuple[int, int], params: CellFinderParams,
                     cell_area: float) -> list[FoundCell]:
    height, width = shape
    found = []
    for region in measure.regionprops(measure.label(mask)):
        if not params.min_area * cell_area <= region.area <= params.max_area * cell_area:
            continue
        y0, x0, y1, x1 = region.bbox
        margin = params.nucleus_margin * max(x1 - x0, y1 - y0)
        grown = Box(max(0, round(x0 - margin)), max(0, round(y0 - margin)),
                    min(width, round(x1 + margin)), min(height, round(y1 + margin)))
        found.append(FoundCell(grown, "stained", int(region.area)))
    return found


# --- unstained cells ---------------------------------------------------------------------


def _unstained_objects(rgb: np.ndarray, stained_mask: np.ndarray, params: CellFinderParams,
                       cell_area: float) -> list[FoundCell]:
    # Red cells are pink on a grey-blue background: CIELAB a* (green → red) separates
    # them better than saturation, which misses pale cells.
    redness = filters.gaussian(lab_a_channel(rgb), sigma=0.02 * params.cell_diameter)
    mask = redness > _otsu(redness)
    # A white cell's pale cytoplasm is saturated too: the ring around each stained object
    # belongs to that object's (grown) box, not to a red cell.
    ring = max(1, round(params.nucleus_margin * 0.5 * params.cell_diameter))
    mask &= ~_dilate(stained_mask, ring)
    smooth = max(1, round(0.05 * params.cell_diameter))
    mask = _dilate(_erode(mask, smooth), smooth)  # an opening
    mask = _fill_holes(mask)
    labels = _split_touching(mask, params)
    found = []
    for region in measure.regionprops(labels):
        if not params.min_red_area * cell_area <= region.area <= params.max_area * cell_area:
            continue
        if _ragged(region, params.min_solidity):
            continue
        y0, x0, y1, x1 = region.bbox
        found.append(FoundCell(Box(x0, y0, x1, y1), "unstained", int(region.area)))
    return found


def _split_touching(mask: np.ndarray, params: CellFinderParams) -> np.ndarray:
    """Label image of ``mask`` with touching round cells cut apart by a watershed."""
    distance = distance_transform(mask)
    min_distance = max(1, round(params.split_distance * params.cell_diameter))
    peaks = peak_local_max(distance, min_distance=min_distance, labels=measure.label(mask),
                           threshold_abs=0.15 * params.cell_diameter, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return segmentation.watershed(-distance, markers, mask=mask)


def _ragged(region: RegionProperties, min_solidity: float) -> bool:
    """Whether the region's solidity (area ÷ convex hull's area) is below ``min_solidity``.

    The hull lies inside the box, so a region filling enough of its box is solid enough
    without computing the hull (a round cell fills π/4 of it): most cells skip that cost.
    """
    y0, x0, y1, x1 = region.bbox
    if region.area >= min_solidity * (y1 - y0) * (x1 - x0):
        return False
    return region.solidity < min_solidity


# The two colour channels, for 8-bit images through lookup tables of the 256 levels: the
# same arithmetic as scikit-image's rgb2hed and rgb2lab (whose results they equal to
# within float rounding), without raising every pixel to a power or taking its log.
def _channel_luts(tables: Iterable[np.ndarray]) -> np.ndarray:
    return np.stack(list(tables), axis=-1).reshape(256, 1, 3)


_LEVELS = util.img_as_float(np.arange(256, dtype=np.uint8))
_OPTICAL_DENSITY = np.log(np.maximum(_LEVELS, 1e-6)) / np.log(1e-6)  # rgb2hed's
_HAEMATOXYLIN_LUTS = _channel_luts(_OPTICAL_DENSITY * color.hed_from_rgb[c, 0] for c in range(3))
_LINEAR = np.where(_LEVELS > 0.04045, ((_LEVELS + 0.055) / 1.055) ** 2.4, _LEVELS / 12.92)
_WHITE = xyz_tristimulus_values(illuminant="D65", observer="2")  # rgb2lab's defaults
_X_LUTS = _channel_luts(_LINEAR * xyz_from_rgb[0, c] / _WHITE[0] for c in range(3))
_Y_LUTS = _channel_luts(_LINEAR * xyz_from_rgb[1, c] / _WHITE[1] for c in range(3))


def haematoxylin_channel(rgb: np.ndarray) -> np.ndarray:
    """The haematoxylin channel of a colour deconvolution (``rgb2hed(rgb)[..., 0]``)."""
    if rgb.dtype != np.uint8:
        return color.rgb2hed(rgb)[..., 0]
    return np.maximum(_lookup(rgb, _HAEMATOXYLIN_LUTS), 0)


def lab_a_channel(rgb: np.ndarray) -> np.ndarray:
    """CIELAB a*, green (−) to red (+), under D65 (``rgb2lab(rgb)[..., 1]``)."""
    if rgb.dtype != np.uint8:
        return color.rgb2lab(rgb)[..., 1]
    return 500.0 * (_lab_f(_lookup(rgb, _X_LUTS)) - _lab_f(_lookup(rgb, _Y_LUTS)))


def _lookup(rgb: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """Σ over channels c of luts[c][rgb[..., c]]: a linear map of per-channel functions.
    ``luts`` is 256×1×3, as OpenCV's LUT (a single pass over the image) takes it."""
    looked_up = cv2.LUT(np.ascontiguousarray(rgb), luts)
    return looked_up[..., 0] + looked_up[..., 1] + looked_up[..., 2]


def _lab_f(t: np.ndarray) -> np.ndarray:
    return np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16.0 / 116.0)


def distance_transform(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``mask`` to the nearest background pixel, equal to
    ``scipy.ndimage.distance_transform_edt``: OpenCV's exact algorithm, whose float32
    result is turned back into the square root of the integer squared distance."""
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if not distance.size or not mask.any():
        return np.zeros(mask.shape)
    if mask.all():  # no background at all: scipy measures to the outside of the array
        return ndi.distance_transform_edt(mask)
    return np.sqrt(np.rint(distance.astype(np.float64) ** 2))


# Binary morphology with disks through OpenCV: the same pixels as scipy.ndimage's (border
# value 0 on both sides), many times faster for the large disks a cell's size calls for.


def _disk(radius: int) -> np.ndarray:
    return morphology.disk(radius).astype(np.uint8)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), _disk(radius), borderType=cv2.BORDER_CONSTANT,
                      borderValue=0).astype(bool)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.erode(mask.astype(np.uint8), _disk(radius), borderType=cv2.BORDER_CONSTANT,
                     borderValue=0).astype(bool)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the image's edge filled
    (4-connected, as scipy.ndimage.binary_fill_holes): a flood from a background frame."""
    framed = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(framed, None, (0, 0), 1, flags=4)  # the background reachable from outside
    return mask | ~framed[1:-1, 1:-1].astype(bool)


def _otsu(channel: np.ndarray) -> float:
    """Otsu's threshold, or +inf for a flat channel (nothing stands out)."""
    return float(filters.threshold_otsu(channel)) if np.ptp(channel) > 0 else math.inf
