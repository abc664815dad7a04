"""Float, 16-bit and 8-bit versions of one image are one image to cellpipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpipe.data.geometry import Box
from cellpipe.data.imageio import ImageLimits, ImageRejected, probe_image, read_rgb
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.readers import open_slide
from cellpipe.slides.scoring import ScoreParams, score_slide
from slide_fixtures import ColourRuleClassifier, smear

PARAMS = ScoreParams(cells=CellFinderParams(cell_diameter=40))


def _versions(folder: Path) -> dict[str, Path]:
    """One smear as 8-bit, 16-bit and float32-in-[0, 1] TIFFs (same pixels, other dtypes)."""
    image = smear((320, 240), seed=3)[0]
    versions = {"uint8": image, "uint16": image.astype(np.uint16) * 257,
                "float32": image.astype(np.float32) / 255}
    paths = {}
    for name, pixels in versions.items():
        paths[name] = folder / f"{name}.tif"
        tifffile.imwrite(paths[name], pixels, photometric="rgb")
    return paths


def test_float_and_16_bit_slides_are_scaled_alike_and_give_the_same_cells(tmp_path: Path) -> None:
    paths = _versions(tmp_path)
    pixels, counts = {}, {}
    for name, path in paths.items():
        with open_slide(path) as reader:
            pixels[name] = reader.read_region(Box(0, 0, 320, 240)).astype(int)
            counts[name] = score_slide(reader, ColourRuleClassifier(), PARAMS).counts
    # A float image in [0, 1] is stretched by its own percentiles, exactly like its
    # 16-bit twin (both are "deeper than 8 bits"); at most a rounding step apart.
    assert np.abs(pixels["float32"] - pixels["uint16"]).max() <= 1
    assert counts["float32"] == counts["uint16"] == counts["uint8"]
    assert sum(counts["uint8"].values()) > 5


def test_ingest_reads_float_and_16_bit_crops_like_each_other(tmp_path: Path) -> None:
    paths = _versions(tmp_path)
    deep = read_rgb(paths["uint16"]).astype(int)
    floating = read_rgb(paths["float32"]).astype(int)
    assert np.abs(deep - floating).max() <= 1


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_an_image_without_finite_pixels_is_rejected_with_a_reason(tmp_path: Path,
                                                                 fill: float) -> None:
    path = tmp_path / "empty.tif"
    tifffile.imwrite(path, np.full((64, 64), fill, np.float32))
    with pytest.raises(ImageRejected, match="no finite pixel values"):
        probe_image(path, ImageLimits())
    with pytest.raises(ImageRejected, match="no finite pixel values"):
        read_rgb(path)


def test_nan_pixels_in_a_float_image_read_as_its_darkest_value(tmp_path: Path) -> None:
    values = np.tile(np.linspace(0.2, 0.8, 64, dtype=np.float32), (64, 1))
    values[:8, :8] = np.nan
    path = tmp_path / "holes.tif"
    tifffile.imwrite(path, values)
    with np.errstate(all="raise"):  # no "invalid value in cast" on the way
        rgb = read_rgb(path)
    assert rgb[:8, :8].max() == 0 and rgb[-1, -1, 0] == 255
