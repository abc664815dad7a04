"""Ingest, slide scoring and served files (the Triton preprocess model, which `cellpipe
triton classify` feeds) apply one rule set: each input is refused by all or read alike."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellpipe.contract import ModelContract, encoded_to_model_input
from cellpipe.data.imageio import ImageLimits, ImageRejected, probe_image, read_rgb
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.readers import SlideUnreadable, open_slide
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier, smear

CONTRACT = ModelContract(class_names=("a", "b"), image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def _gif_animated() -> bytes:
    frames = [Image.fromarray(np.full((64, 64, 3), value, np.uint8)) for value in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _tiff(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels)
    return buffer.getvalue()


def _huge_untiled_tiff(path: Path) -> None:
    """A TIFF whose header declares 100000 × 100000 px in one strip, cut after the header
    (tifffile writes the 10 GB strip sparse; the cut keeps it from ever taking space)."""
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(shape=(100_000, 100_000), dtype=np.uint8, rowsperstrip=100_000)
    with tifffile.TiffFile(path) as tif:
        header_end = tif.pages[0].dataoffsets[0]
    with path.open("r+b") as handle:
        handle.truncate(header_end)


REFUSED: dict[str, tuple[str, Callable[[], bytes], str]] = {
    # name in the inbox / source: (suffix, bytes, what the reason says)
    "one_pixel_png": (".png", lambda: _png(np.zeros((1, 1, 3), np.uint8)), "minimum side"),
    "one_pixel_tiff": (".tif", lambda: _tiff(np.zeros((1, 1), np.uint8)), "minimum side"),
    "animated_gif_named_png": (".png", _gif_animated, "unsupported image format GIF"),
    "text_named_tif": (".tif", lambda: b"lab notes, not an image", "not a recognised image"),
}


def _score(inbox: Path, out: Path) -> dict[str, dict]:
    report = score_inbox(str(inbox), out, ColourRuleClassifier(),
                         ScoreParams(cells=CellFinderParams(cell_diameter=40)),
                         ModelKey("colour_rules", "1"))
    return {s["slide"]: s for s in report["slides"]}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_an_input_one_entry_point_refuses_is_refused_by_all(tmp_path: Path, name: str) -> None:
    suffix, make, reason = REFUSED[name]
    data = make()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / f"{name}{suffix}"
    path.write_bytes(data)
    with pytest.raises(ImageRejected, match=reason):  # ingest
        probe_image(path, ImageLimits())
    with pytest.raises(ImageRejected, match=reason):  # served files
        encoded_to_model_input([data], CONTRACT)
    outcome = _score(inbox, tmp_path / "results")[path.name]  # slide scoring
    assert outcome["status"] == "quarantined" and reason in outcome["reason"]


def test_a_jpeg_named_tif_is_read_as_the_jpeg_it_is_everywhere(tmp_path: Path) -> None:
    pixels = smear((160, 120), seed=1)[0]
    data = _jpeg(pixels)
    path = tmp_path / "inbox" / "camera.tif"
    path.parent.mkdir()
    path.write_bytes(data)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(read_rgb(path), expected)  # ingest/preprocess
    with open_slide(path) as reader:  # scoring
        np.testing.assert_array_equal(reader.read_region(reader_box(reader)), expected)
    assert encoded_to_model_input([data], CONTRACT).shape == (1, 3, 16, 16)  # served
    assert _score(path.parent, tmp_path / "results")["camera.tif"]["status"] == "scored"


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied_everywhere(tmp_path: Path, orientation: int) -> None:
    upright = smear((120, 80), seed=2)[0]  # 80 rows × 120 columns
    stored = _stored_for_orientation(upright, orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(stored, exif=exif.tobytes())
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    read = read_rgb(path)
    assert read.shape == upright.shape
    assert np.abs(read.astype(int) - upright).mean() < 4  # JPEG noise, not a rotation
    page = probe_image(path, ImageLimits())[0]
    assert (page.width, page.height) == (120, 80)
    with open_slide(path) as reader:
        assert reader.dimensions == (120, 80)
    direct = encoded_to_model_input([data], CONTRACT)
    via_file = encoded_to_model_input([_png(read)], CONTRACT)
    assert np.abs(direct - via_file).max() < 1e-6


def test_a_huge_untiled_tiff_is_refused_by_its_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.tif"
    _huge_untiled_tiff(path)
    with pytest.raises(SlideUnreadable, match="untiled strip .* exceeds the limit"):
        open_slide(path)
    with pytest.raises(ImageRejected, match="exceeds the limit"):
        probe_image(path, ImageLimits())


def reader_box(reader):  # noqa: ANN001, ANN201
    from cellpipe.data.geometry import Box

    width, height = reader.dimensions
    return Box(0, 0, width, height)


def _stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that applying EXIF ``orientation`` gives ``upright``."""
    image = Image.fromarray(upright)
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}[orientation]
    return np.asarray(image.transpose(inverse))


def test_a_large_untiled_tiff_in_small_strips_is_a_slide(tmp_path: Path) -> None:
    """Read strip by strip, a stitched mosaic may exceed the whole-image limit (10^8 px)."""
    path = tmp_path / "mosaic.tif"
    with tifffile.TiffWriter(path) as writer:  # the header alone matters here (sparse)
        writer.write(shape=(9_000, 12_000), dtype=np.uint8, rowsperstrip=16)
    with open_slide(path) as reader:
        assert reader.dimensions == (12_000, 9_000)


def test_a_multi_picture_jpeg_is_read_as_its_first_picture(tmp_path: Path) -> None:
    first, second = smear((120, 80), seed=4)[0], smear((120, 80), seed=5)[0]
    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, format="MPO", save_all=True,
                                append_images=[Image.fromarray(second)], quality=95)
    path = tmp_path / "phone.jpg"
    path.write_bytes(buffer.getvalue())
    assert np.abs(read_rgb(path).astype(int) - first).mean() < 4
    assert encoded_to_model_input([buffer.getvalue()], CONTRACT).shape == (1, 3, 16, 16)
