"""Cell finding's OpenCV morphology equals scipy.ndimage's, pixel for pixel.

The cell finder moved its binary morphology to OpenCV for speed; the counts on slides must
not move with it. Random masks with holes, touching the image border, check each step.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import morphology

from cellpipe.slides.cells import _dilate, _erode, _fill_holes


def _random_mask(seed: int, shape: tuple[int, int] = (97, 131)) -> np.ndarray:
    """Blobs and specks, with holes, some cut by the image border."""
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.random(shape), sigma=rng.uniform(1, 4))
    return noise > np.quantile(noise, rng.uniform(0.3, 0.7))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("radius", [1, 3, 8])
def test_dilation_erosion_closing_and_opening_equal_scipy(seed: int, radius: int) -> None:
    mask, disk = _random_mask(seed), morphology.disk(radius)
    assert np.array_equal(_dilate(mask, radius), ndi.binary_dilation(mask, disk))
    assert np.array_equal(_erode(mask, radius), ndi.binary_erosion(mask, disk))
    assert np.array_equal(_erode(_dilate(mask, radius), radius),
                          ndi.binary_closing(mask, disk, border_value=0))
    assert np.array_equal(_dilate(_erode(mask, radius), radius), ndi.binary_opening(mask, disk))


@pytest.mark.parametrize("seed", range(8))
def test_fill_holes_equals_scipy(seed: int) -> None:
    mask = _random_mask(seed)
    assert np.array_equal(_fill_holes(mask), ndi.binary_fill_holes(mask))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7], ring[4, 4] = True, False
    assert _fill_holes(ring)[4, 4]  # the one-pixel hole of a ring
