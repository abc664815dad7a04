"""Each fast step of cell finding equals its scikit-image/scipy reference.

The cell finder moved its colour channels to lookup tables, its binary morphology and
distance transform to OpenCV, and skips the convex hull of shapes that fill their box, for
speed; the counts on slides must not move with it. Random images and masks with holes,
touching the image border, check each step.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import color, measure, morphology

from cellpipe.slides.cells import (
    _dilate,
    _erode,
    _fill_holes,
    _ragged,
    distance_transform,
    haematoxylin_channel,
    lab_a_channel,
)


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


def _random_rgb(seed: int, shape: tuple[int, int] = (61, 83)) -> np.ndarray:
    """Every 8-bit level somewhere, and smooth stain-like patches."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    image[0, :, :] = np.arange(shape[1])[:, None] * 255 // (shape[1] - 1)  # 0 and 255 too
    return image


@pytest.mark.parametrize("seed", range(4))
def test_colour_channels_equal_scikit_image(seed: int) -> None:
    rgb = _random_rgb(seed)
    np.testing.assert_allclose(haematoxylin_channel(rgb), color.rgb2hed(rgb)[..., 0],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(lab_a_channel(rgb), color.rgb2lab(rgb)[..., 1],
                               rtol=0, atol=1e-9)
    as_float = rgb / 255.0  # not 8-bit: scikit-image itself
    assert np.array_equal(lab_a_channel(as_float), color.rgb2lab(as_float)[..., 1])


@pytest.mark.parametrize("seed", range(6))
def test_distance_transform_equals_scipy(seed: int) -> None:
    mask = _random_mask(seed)
    assert np.array_equal(distance_transform(mask), ndi.distance_transform_edt(mask))
    for edge_case in (np.zeros((5, 7), bool), np.ones((5, 7), bool)):
        assert np.array_equal(distance_transform(edge_case),
                              ndi.distance_transform_edt(edge_case))


@pytest.mark.parametrize("seed", range(4))
def test_the_solidity_shortcut_gives_the_solidity_answer(seed: int) -> None:
    regions = measure.regionprops(measure.label(_random_mask(seed, (150, 150))))
    assert len(regions) > 3
    for threshold in (0.3, 0.6, 0.8, 0.95):
        for region in regions:
            assert _ragged(region, threshold) == (region.solidity < threshold)
