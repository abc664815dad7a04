"""The one decoder: every TIFF kind reads right, every bad input is rejected with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpipe.data.imageio import ImageLimits, ImageRejected, probe_image, read_rgb, to_rgb_uint8
from conftest import save, unique_image

LIMITS = ImageLimits(min_side=16, max_pixels=10_000_000)


def _gradient(height: int, width: int, dtype: type, top: float) -> np.ndarray:
    """A horizontal ramp from 0 to ``top``: easy to check after rescaling."""
    return np.tile(np.linspace(0, top, width, dtype=np.float64), (height, 1)).astype(dtype)


# --- TIFF kinds ----------------------------------------------------------------------------


def test_tiff_8bit_gray_is_replicated_to_rgb(tmp_path: Path) -> None:
    gray = _gradient(20, 30, np.uint8, 255)
    tifffile.imwrite(tmp_path / "g.tif", gray)
    rgb = read_rgb(tmp_path / "g.tif")
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], gray)
    np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])


def test_tiff_16bit_uses_its_real_range(tmp_path: Path) -> None:
    # A 12-bit camera in a 16-bit container: 'dtype' scaling is dark, 'percentile' fills 0-255.
    twelve_bit = _gradient(20, 200, np.uint16, 4095)
    tifffile.imwrite(tmp_path / "c.tif", twelve_bit)
    stretched = read_rgb(tmp_path / "c.tif", scaling="percentile")
    by_dtype = read_rgb(tmp_path / "c.tif", scaling="dtype")
    assert stretched[..., 0].min() == 0 and stretched[..., 0].max() == 255
    assert by_dtype.max() == round(4095 / 65535 * 255)
    assert np.all(np.diff(stretched[0, :, 0].astype(int)) >= 0), "rescaling must keep the order"


def test_tiff_rgb_and_rgba(tmp_path: Path) -> None:
    rgb = unique_image(1, (10, 120, 240), size=(30, 20))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgb.tif"), rgb)
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.tif"), rgb)  # alpha dropped


def test_tiff_planar_rgb(tmp_path: Path) -> None:
    rgb = unique_image(2, (200, 30, 90), size=(30, 20))
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb",
                     planarconfig="separate")
    np.testing.assert_array_equal(read_rgb(tmp_path / "planar.tif"), rgb)


def test_tiff_compressed(tmp_path: Path) -> None:
    rgb = unique_image(3, (90, 90, 200), size=(64, 48))
    tifffile.imwrite(tmp_path / "lzw.tif", rgb, photometric="rgb", compression="lzw")
    tifffile.imwrite(tmp_path / "zip.tif", rgb, photometric="rgb", compression="zlib")
    np.testing.assert_array_equal(read_rgb(tmp_path / "lzw.tif"), rgb)
    np.testing.assert_array_equal(read_rgb(tmp_path / "zip.tif"), rgb)


def test_tiff_multipage_first_or_all(tmp_path: Path) -> None:
    pages = [np.full((20, 24), value, np.uint8) for value in (10, 100, 200)]
    with tifffile.TiffWriter(tmp_path / "stack.tif") as writer:
        for page in pages:
            writer.write(page)
    assert [p.index for p in probe_image(tmp_path / "stack.tif", LIMITS, pages="first")] == [0]
    infos = probe_image(tmp_path / "stack.tif", LIMITS, pages="all")
    assert [(p.index, p.width, p.height) for p in infos] == [(0, 24, 20), (1, 24, 20), (2, 24, 20)]
    for index, page in enumerate(pages):
        assert read_rgb(tmp_path / "stack.tif", index)[0, 0, 0] == page[0, 0]


def test_tiff_pyramid_levels_are_not_pages(tmp_path: Path) -> None:
    base = unique_image(4, (120, 60, 160), size=(64, 64))
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as writer:
        writer.write(base, photometric="rgb", tile=(16, 16))
        writer.write(base[::2, ::2], photometric="rgb", tile=(16, 16), subfiletype=1)
    infos = probe_image(tmp_path / "pyramid.tif", LIMITS, pages="all")
    assert [(p.width, p.height) for p in infos] == [(64, 64)]
    np.testing.assert_array_equal(read_rgb(tmp_path / "pyramid.tif"), base)


def test_float_tiff_in_unit_range(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "f.tif", _gradient(20, 30, np.float32, 1.0))
    rgb = read_rgb(tmp_path / "f.tif", scaling="dtype")
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255


def test_16bit_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    ramp = _gradient(20, 100, np.uint16, 60000)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    rgb = read_rgb(path, scaling="dtype")
    assert rgb[0, -1, 0] == round(60000 / 65535 * 255)
    assert len(np.unique(rgb[0, :, 0])) > 50


def test_unsupported_channel_count_is_rejected() -> None:
    with pytest.raises(ImageRejected, match="channel count 5"):
        to_rgb_uint8(np.zeros((4, 4, 5), np.uint8))


# --- bad inputs ----------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageRejected, match="empty file"):
        probe_image(tmp_path / "empty.png", LIMITS)


def test_non_image_with_image_suffix(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("these are lab notes, not a picture")
    with pytest.raises(ImageRejected, match="not a recognised image"):
        probe_image(tmp_path / "notes.jpg", LIMITS)
    (tmp_path / "notes.tif").write_text("not a tiff either")  # the content decides
    with pytest.raises(ImageRejected, match="not a recognised image"):
        probe_image(tmp_path / "notes.tif", LIMITS)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 a TIFF header, then nothing")
    with pytest.raises(ImageRejected, match="not a readable TIFF|TIFF has no image pages"):
        probe_image(tmp_path / "broken.tif", LIMITS)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    pixels = unique_image(5, (100, 150, 200), size=(200, 150))
    if suffix == ".tif":
        tifffile.imwrite(path, pixels, photometric="rgb")
    else:
        save(path, pixels)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageRejected, match="truncated|corrupt|cannot"):
        probe_image(path, LIMITS)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    # A 1-bit 6000×6000 PNG is a few kB on disk but 36 Mpx once decoded.
    from PIL import Image

    Image.new("1", (6000, 6000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 50_000
    with pytest.raises(ImageRejected, match="decompression|exceeds the limit"):
        probe_image(tmp_path / "bomb.png", ImageLimits(min_side=16, max_pixels=1_000_000))


def test_tiff_bomb_is_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((2000, 2000), np.uint8), compression="zlib")
    with pytest.raises(ImageRejected, match="exceeds the limit"):
        probe_image(tmp_path / "big.tif", ImageLimits(min_side=16, max_pixels=1_000_000))


def test_image_under_minimum_size(tmp_path: Path) -> None:
    save(tmp_path / "tiny.png", unique_image(6, (1, 2, 3), size=(40, 10)))
    with pytest.raises(ImageRejected, match="smaller than the minimum side of 16"):
        probe_image(tmp_path / "tiny.png", LIMITS)


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(ImageRejected, match="cannot read file"):
        probe_image(tmp_path / "gone.png", LIMITS)
