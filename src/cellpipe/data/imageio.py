"""Decode every supported microscopy image kind into RGB uint8 arrays.

This is the one decoder of the project, and its rules are the one rule set for what an
image is: ingest validates files with it, preprocess reads pixels through it, slide
scoring reads camera fields through it, and the Triton preprocess model and
``cellpipe triton classify`` decode the bytes they are sent with it. So training and
serving see the same pixels and refuse the same files:

* the format is sniffed from the content, never the suffix: TIFF (tifffile: 8/16-bit,
  float, grayscale, RGB, RGBA, planar, multi-page), and PNG, JPEG, BMP (Pillow);
  anything else (GIF, WebP…) is refused, as is an animated (multi-frame) image;
* :class:`ImageLimits` bounds the size (shortest side, pixels per page);
* EXIF orientation is applied, so a phone or camera picture is upright.

Problems with a file are raised as :class:`ImageRejected`, whose message is the
reason written to the rejected list.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import tifffile
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
# Pillow's names of the formats it decodes for us (TIFF is tifffile's).
PILLOW_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP"})

BitDepthScaling = Literal["percentile", "dtype"]
# First bytes of classic and BigTIFF files, little- and big-endian.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Percentiles for the "percentile" scaling: microscopy cameras often fill only 12
# of 16 bits, so scaling by the dtype's range would give nearly black images.
_LOW_PERCENTILE, _HIGH_PERCENTILE = 0.5, 99.5
# One wording for a TIFF header without a page, whichever entry point reads it.
NO_TIFF_PAGES = "not a readable TIFF: it has no image pages"


class ImageRejected(Exception):
    """The file cannot be used; the message says why in words a user can act on."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds a usable image must respect (pixels per page, shortest side)."""

    min_side: int = 16
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class PageInfo:
    """Size of one usable page (frame) of an image file."""

    index: int
    width: int
    height: int


def is_tiff(path: Path) -> bool:
    """Whether the file's first bytes are a TIFF header (classic or BigTIFF)."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def probe_image(
    path: Path, limits: ImageLimits, *, pages: Literal["first", "all"] = "first"
) -> list[PageInfo]:
    """Check that ``path`` decodes completely and return the size of each selected page.

    Every selected page is decoded (not only its header), so truncated files are
    caught here rather than in a later stage.
    """
    _check_readable(path)
    if is_tiff(path):
        return _probe_tiff(path, limits, pages)
    return [_probe_pillow(path, limits)]


def read_rgb(path: Path, page: int = 0, *, scaling: BitDepthScaling = "percentile",
             limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode one page of ``path`` to an H×W×3 uint8 RGB array."""
    _check_readable(path)
    if is_tiff(path):
        return _read_tiff_page(path, page, scaling, limits)
    if page != 0:
        raise ImageRejected(f"page {page} requested, but only TIFF files have several pages")
    return _read_pillow(path, scaling, limits)


def decode_rgb(data: bytes, *, scaling: BitDepthScaling = "percentile",
               limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode an encoded image held in memory (e.g. sent to a server) like :func:`read_rgb`.

    The format is recognised from the content, not a name: TIFF (first usable
    page) through tifffile, PNG, JPEG, BMP and the rest through Pillow.
    """
    if not data:
        raise ImageRejected("empty image (0 bytes)")
    stream = io.BytesIO(data)
    if data[:4] in _TIFF_MAGIC:
        return _read_tiff_page(stream, 0, scaling, limits)
    return _read_pillow(stream, scaling, limits)


def to_rgb_uint8(array: np.ndarray, scaling: BitDepthScaling = "percentile", *,
                 value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Convert a decoded H×W or H×W×C array of any dtype to H×W×3 uint8.

    Gray is replicated to three channels; alpha (RGBA, gray+alpha) is dropped,
    since microscopy alpha carries no stain information. ``value_range`` fixes the
    input values mapped to 0 and 255 (from :func:`value_range_of` on a whole slide's
    overview), so every region of one slide is scaled alike.
    """
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.ndim != 3:
        raise ImageRejected(f"unsupported array shape {array.shape}")
    _check_pixel_type(array)
    array = _as_uint8(array, scaling, value_range)
    channels = array.shape[-1]
    if channels in (1, 2):
        return np.repeat(array[..., :1], 3, axis=-1)
    if channels in (3, 4):
        return np.ascontiguousarray(array[..., :3])
    raise ImageRejected(f"unsupported channel count {channels} (expected 1, 2, 3 or 4)")


# --- helpers ---------------------------------------------------------------------------


def _check_readable(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageRejected(f"cannot read file: {error.strerror or error}") from error
    if not path.is_file():
        raise ImageRejected("not a regular file")
    if size == 0:
        raise ImageRejected("empty file (0 bytes)")


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageRejected(
            f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{limits.max_pixels:,} (decompression-bomb guard, ingest.max_image_pixels)"
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(
            f"{width}x{height} is smaller than the minimum side of {limits.min_side} px"
        )


def _open_pillow(path: Path | BinaryIO, limits: ImageLimits) -> Image.Image:
    """Open (header only) with Pillow, with its bomb guard set to our own limit."""
    # Pillow's guard is a module global; align it with ours so that a limit raised in
    # params is honoured, and silence its warning since _check_size reports the case.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageRejected(f"decompression bomb: {error}") from error
    except Image.UnidentifiedImageError as error:
        precision = _jpeg_precision(path)
        if precision not in (None, 8):
            raise ImageRejected(f"{precision}-bit JPEG is not supported (only 8-bit JPEG is): "
                                f"save it as a 16-bit TIFF or PNG") from error
        raise ImageRejected("not a recognised image (unknown or corrupt header)") from error
    except OSError as error:
        raise ImageRejected(f"cannot open image: {error}") from error
    if image.format not in PILLOW_FORMATS:
        image.close()
        raise ImageRejected(f"unsupported image format {image.format or 'unknown'} "
                            f"(supported: {', '.join(sorted(PILLOW_FORMATS | {'TIFF'}))})")
    # A multi-picture JPEG (MPO: phones, cameras with depth or gain maps) is a still
    # JPEG whose first frame is the picture; other formats with frames are animations.
    if image.format != "MPO" and getattr(image, "n_frames", 1) > 1:
        image.close()
        raise ImageRejected(f"animated {image.format} with {image.n_frames} frames: "
                            f"one still image is expected")
    # The stored size, not the upright one: the limits (pixel count, shortest side) are
    # the same either way, and reading a PNG's orientation (getexif) makes Pillow decode
    # the whole image, before this check, and leaves a decode error unraised for later.
    _check_size(*image.size, limits)
    return image


# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman or
# arithmetic): the byte after their length is the sample precision in bits.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF})


def _jpeg_precision(source: Path | BinaryIO) -> int | None:
    """Bits per sample of a JPEG, from its frame header; None when it is not a JPEG.

    Pillow decodes 8-bit JPEG only, and reports a 12- or 16-bit one (some scientific
    cameras write them) as an unknown image; this lets the reason say what the file is.
    """
    try:
        if isinstance(source, Path):
            with source.open("rb") as handle:
                head = handle.read(1 << 16)
        else:
            source.seek(0)
            head = source.read(1 << 16)
    except OSError:
        return None
    if head[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 9 <= len(head) and head[position] == 0xFF:
        marker = head[position + 1]
        if marker in _JPEG_SOF:
            return head[position + 4]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        position += 2 + int.from_bytes(head[position + 2:position + 4], "big")
    return None


def _decode_pillow(image: Image.Image) -> Image.Image:
    """The decoded image, turned upright by its EXIF orientation."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow raises OSError("image file is truncated ...") for cut-off files and
        # SyntaxError/ValueError for some broken headers it only notices on decode.
        raise ImageRejected(f"cannot decode image (truncated or corrupt): {error}") from error


def _probe_pillow(path: Path, limits: ImageLimits) -> PageInfo:
    with _open_pillow(path, limits) as image:
        return PageInfo(0, *_decode_pillow(image).size)


def _read_pillow(path: Path | BinaryIO, scaling: BitDepthScaling,
                 limits: ImageLimits) -> np.ndarray:
    with _open_pillow(path, limits) as image:
        upright = _decode_pillow(image)
        if upright.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit and float PNGs: Pillow's convert("RGB") would clip, not rescale.
            return to_rgb_uint8(np.asarray(upright), scaling)
        return np.asarray(upright.convert("RGB"))


def usable_tiff_pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """Main-resolution pages: pyramid levels and thumbnails are not separate images."""
    return [page for page in tif.pages if not getattr(page, "is_reduced", False)]


def _open_tiff(path: Path | BinaryIO) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path)
    except Exception as error:  # tifffile raises many types for broken headers
        raise ImageRejected(f"not a readable TIFF: {type(error).__name__}: {error}") from error


def _decode_tiff_page(page: tifffile.TiffPage) -> np.ndarray:
    try:
        array = page.asarray()
    except Exception as error:  # codec errors come from imagecodecs with their own types
        raise ImageRejected(
            f"cannot decode TIFF page {page.index} (truncated or corrupt): "
            f"{type(error).__name__}: {error}"
        ) from error
    if page.axes.startswith("S") and array.ndim == 3:
        array = np.moveaxis(array, 0, -1)  # planar (separate) samples → H×W×C
    return array


def _probe_tiff(path: Path, limits: ImageLimits, pages: Literal["first", "all"]) -> list[PageInfo]:
    with _open_tiff(path) as tif:
        usable = usable_tiff_pages(tif)
        if not usable:
            raise ImageRejected(NO_TIFF_PAGES)
        selected = usable[:1] if pages == "first" else usable
        infos = []
        for number, page in enumerate(selected):
            _check_size(page.imagewidth, page.imagelength, limits)
            to_rgb_uint8(_decode_tiff_page(page))  # proves pixels decode and convert
            infos.append(PageInfo(number, page.imagewidth, page.imagelength))
        return infos


def _read_tiff_page(path: Path | BinaryIO, page: int, scaling: BitDepthScaling,
                    limits: ImageLimits) -> np.ndarray:
    with _open_tiff(path) as tif:
        usable = usable_tiff_pages(tif)
        if not usable:
            raise ImageRejected(NO_TIFF_PAGES)
        if page >= len(usable):
            raise ImageRejected(f"TIFF has {len(usable)} usable pages, page {page} requested")
        selected = usable[page]
        _check_size(selected.imagewidth, selected.imagelength, limits)
        return to_rgb_uint8(_decode_tiff_page(selected), scaling)


def value_range_of(array: np.ndarray, scaling: BitDepthScaling) -> tuple[float, float]:
    """Input values that ``scaling`` maps to 0 and 255 for this array's dtype and content.

    Only finite values count (NaN marks "no data" in float images); an image without
    any is rejected. The span is at least one grey level of the input: 1 for integers,
    and for floats the smallest step the values can resolve, so a float image in [0, 1]
    keeps its own range instead of being stretched as if it were integer-valued.
    """
    _check_pixel_type(array)
    integer = np.issubdtype(array.dtype, np.integer)
    values = array if integer else array[np.isfinite(array)]
    if values.size == 0:
        raise ImageRejected("no finite pixel values (every pixel is NaN or infinite)")
    if scaling == "percentile":
        low, high = np.percentile(values.astype(np.float32), [_LOW_PERCENTILE,
                                                               _HIGH_PERCENTILE])
    elif integer:
        info = np.iinfo(array.dtype)
        low, high = info.min, info.max
    else:
        low, high = 0.0, 1.0  # float images are conventionally in [0, 1]
    smallest_step = 1.0 if integer else float(np.spacing(np.float32(max(abs(low), abs(high)))))
    return float(low), float(max(high, low + smallest_step))


def _check_pixel_type(array: np.ndarray) -> None:
    """Only real numbers are pixel values: a complex TIFF (an FFT, say) would otherwise be
    read with its imaginary part silently dropped."""
    kind = array.dtype
    if not (kind == np.bool_ or np.issubdtype(kind, np.integer)
            or np.issubdtype(kind, np.floating)):
        raise ImageRejected(f"unsupported pixel type {kind} (expected integers, floats or bool)")


def _as_uint8(array: np.ndarray, scaling: BitDepthScaling,
              value_range: tuple[float, float] | None = None) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    low, high = value_range or value_range_of(array, scaling)
    values = array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.integer):
        # "No data" pixels show as background-dark rather than failing the cast.
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
