"""Open any slide image behind one small reader interface (TIAToolbox's reader-factory idea).

* ``PillowSlide``   PNG, JPEG, BMP: camera fields of a few megapixels, decoded whole.
* ``TiffSlide``     TIFF of any bit depth, multi-page (each page a field) and tiled or
                    pyramidal, through tifffile + zarr: a region decodes only the tiles
                    or strips it touches, so a slide never sits whole in memory.
* ``OpenSlideSlide`` whole-slide formats (.svs, .ndpi, .mrxs, .scn, …) through OpenSlide
                    (openslide-python with the openslide-bin library from PyPI).

Regions come back as H×W×3 uint8 RGB. Deeper bit depths are scaled with one value range
per page, taken from the page's overview, so every region of a slide is scaled alike.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
import zarr
from PIL import Image

from cellpipe.data.geometry import Box
from cellpipe.data.imageio import (
    NO_TIFF_PAGES,
    BitDepthScaling,
    ImageLimits,
    ImageRejected,
    is_tiff,
    read_rgb,
    to_rgb_uint8,
    usable_tiff_pages,
    value_range_of,
)
from cellpipe.errors import CellpipeError

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
# Suffixes of whole-slide formats: a file named so goes to OpenSlide, which says why it
# cannot read it. Any file OpenSlide recognises goes to it anyway, named as it may be
# (DICOM .dcm, Zeiss .czi, a renamed .svs…): the suffix only words the refusal.
OPENSLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
                                ".svslide", ".dcm", ".czi", ".tif", ".tiff"})
SLIDE_SUFFIXES = PILLOW_SUFFIXES | TIFF_SUFFIXES | OPENSLIDE_SUFFIXES


class SlideUnreadable(CellpipeError):
    """The slide cannot be opened or decoded; the message says why."""


class SlideReader(ABC):
    """Lazy access to one slide: levels (resolutions) and pages (separate fields)."""

    path: Path

    @property
    @abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of every level, full resolution first."""

    @property
    def pages(self) -> int:
        """Separate fields in the file (pages of a multi-page TIFF); 1 for most slides."""
        return 1

    @abstractmethod
    def read_region(self, box: Box, *, level: int = 0, page: int = 0) -> np.ndarray:
        """Pixels of ``box`` (in ``level``'s coordinates) as H×W×3 uint8 RGB."""

    def close(self) -> None:  # noqa: B027 (most readers hold nothing to close)
        """Release file handles."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def downsample(self, level: int) -> float:
        """Full-resolution pixels per pixel of ``level``."""
        return self.dimensions[0] / self.level_dimensions[level][0]

    def overview(self, max_side: int, *, page: int = 0) -> tuple[np.ndarray, float]:
        """The whole page at most ``max_side`` px wide or tall, and its scale (px per level-0 px).

        Read from the coarsest level that is still at least ``max_side`` px, so a
        pyramid's overview costs one small level, not the full slide.
        """
        level = self._overview_level(max_side)
        width, height = self.level_dimensions[level]
        image = self.read_region(Box(0, 0, width, height), level=level, page=page)
        factor = min(1.0, max_side / max(width, height))
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        return image, image.shape[1] / self.dimensions[0]

    def _overview_level(self, max_side: int) -> int:
        candidates = [level for level, (w, h) in enumerate(self.level_dimensions)
                      if max(w, h) >= max_side]
        return candidates[-1] if candidates else len(self.level_dimensions) - 1


class PillowSlide(SlideReader):
    """A camera field (PNG/JPEG/BMP), decoded once: these are a few megapixels at most."""

    def __init__(self, path: Path, *, scaling: BitDepthScaling = "percentile",
                 limits: ImageLimits | None = None) -> None:
        self.path = path
        try:
            self._rgb = read_rgb(path, scaling=scaling, limits=limits or ImageLimits())
        except ImageRejected as error:
            raise SlideUnreadable(str(error)) from error

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(self._rgb.shape[1], self._rgb.shape[0])]

    def read_region(self, box: Box, *, level: int = 0, page: int = 0) -> np.ndarray:
        _check_index("level", level, 1)
        _check_index("page", page, 1)
        return self._rgb[box.y0:box.y1, box.x0:box.x1]


# A TIFF is read region by region, tile by tile or strip by strip, so a page may be far
# larger than an image decoded whole (ImageLimits.max_pixels, which bounds one tile or
# strip instead): up to a whole-slide scan at 40x (~10^10 px), with room.
MAX_SLIDE_PIXELS = 10**11


class TiffSlide(SlideReader):
    """TIFF through tifffile; regions read lazily through its zarr store, or, for the
    JPEG-tiled 8-bit pages of whole-slide scans, straight from the file's tiles.

    Safe to read from several threads at once: file reads hold the file handle's lock
    (tifffile's own, which its zarr store takes too), decoding runs outside it, and the
    decoded-tile cache is an ``lru_cache`` (a tile two threads miss at once is decoded
    twice, the same pixels).
    """

    # Decoded JPEG tiles kept for the next regions: a 224 px grid over 256 px file tiles
    # touches ~3.5 file tiles per region, so without the cache each is decoded 3-4 times.
    # 64 MB holds two rows of 256 px RGB tiles across a 43,000 px wide slide, and stays
    # 64 MB whatever the slide's size.
    TILE_CACHE_BYTES = 64 * 2**20

    def __init__(self, path: Path, *, scaling: BitDepthScaling = "percentile",
                 limits: ImageLimits | None = None) -> None:
        self.path, self._scaling = path, scaling
        try:
            self._tif = tifffile.TiffFile(path)
            if not usable_tiff_pages(self._tif):  # before series[0], which has none either
                raise SlideUnreadable(NO_TIFF_PAGES)
            _check_tiff_size(self._tif, limits or ImageLimits())
            series = self._tif.series[0]
            # Whether samples are stored as separate planes (S×H×W) comes from the TIFF's
            # own axes, as imageio reads it: guessing from the array's shape took a planar
            # 5-channel page for 5 rows of 64 channels, and a planar 2-channel one too.
            if len(series.levels) > 1:  # a pyramid: one field, several resolutions
                store = zarr.open(series.aszarr(), mode="r")  # a group: one array per level
                self._levels = [_Plane(store[str(index)], level.axes.startswith("S"))
                                for index, level in enumerate(series.levels)]
                self._pages = [self._levels[0]]
                planes = self._levels
                tiff_pages = [None if series.transform else level.keyframe
                              for level in series.levels]
            else:  # every full-resolution page is a field of its own
                tiff_pages = usable_tiff_pages(self._tif)
                self._pages = [_Plane(zarr.open(page.aszarr(), mode="r"),
                                      page.axes.startswith("S"))
                               for page in tiff_pages]
                self._levels = self._pages[:1]
                planes = self._pages
            # Per level (pyramid) or page: the TIFF page whose regions are cut from its own
            # JPEG tiles, or None to read through zarr.
            self._jpeg_tiled = [self._jpeg_tiled_page(page, plane)
                                for page, plane in zip(tiff_pages, planes, strict=True)]
        except SlideUnreadable:
            raise
        except Exception as error:  # tifffile raises many types for broken headers
            raise SlideUnreadable(f"not a readable TIFF: {type(error).__name__}: {error}") \
                from error
        # Several threads may first ask for a page's range at once: each computes the same
        # value, so the dict needs no lock.
        self._value_ranges: dict[int, tuple[float, float]] = {}
        # tifffile's zarr store sets this lock too; the tile path must hold the same one.
        self._tif.filehandle.set_lock(True)
        tile_bytes = max((page.tilewidth * page.tilelength * page.samplesperpixel
                          for page in self._jpeg_tiled if page is not None), default=1)
        self._tile = functools.lru_cache(maxsize=max(16, self.TILE_CACHE_BYTES // tile_bytes))(
            self._decode_tile)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [plane.width_height for plane in self._levels]

    @property
    def pages(self) -> int:
        return len(self._pages)

    def read_region(self, box: Box, *, level: int = 0, page: int = 0) -> np.ndarray:
        _check_index("page", page, self.pages)
        _check_index("level", level, len(self._levels))
        index = level if self.pages == 1 else page
        plane = self._levels[index] if self.pages == 1 else self._pages[index]
        array = plane.array
        try:
            if self._jpeg_tiled[index] is not None:
                raw = self._read_tiles(index, box)
            elif plane.planar:
                raw = np.moveaxis(array[:, box.y0:box.y1, box.x0:box.x1], 0, -1)
            else:
                raw = array[box.y0:box.y1, box.x0:box.x1]
        except Exception as error:  # codec errors from imagecodecs carry their own types
            raise SlideUnreadable(f"cannot decode region {box.as_tuple()} of page {page} "
                                  f"(truncated or corrupt): {type(error).__name__}: {error}") \
                from error
        if raw.dtype == np.uint8:
            return to_rgb_uint8(raw)
        return to_rgb_uint8(raw, value_range=self._value_range(page))

    def close(self) -> None:
        self._tile.cache_clear()
        self._tif.close()

    def _read_tiles(self, index: int, box: Box) -> np.ndarray:
        """``box`` of a JPEG-tiled page, pasted from its (cached) decoded tiles.

        The same pixels as its zarr store gives (both decode each tile whole with
        imagecodecs), without zarr's event loop: that runs every decode of every thread
        on its one thread (tifffile decodes in line there below three cores), so reading
        through zarr from several threads used one core.
        """
        page = self._jpeg_tiled[index]
        width, height = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // width)
        out = np.empty((box.height, box.width, page.samplesperpixel), np.uint8)
        for row in range(box.y0 // height, (box.y1 - 1) // height + 1):
            for column in range(box.x0 // width, (box.x1 - 1) // width + 1):
                tile = self._tile(index, row * across + column)
                x0, y0 = max(box.x0, column * width), max(box.y0, row * height)
                x1, y1 = min(box.x1, (column + 1) * width), min(box.y1, (row + 1) * height)
                out[y0 - box.y0:y1 - box.y0, x0 - box.x0:x1 - box.x0] = \
                    tile[y0 - row * height:y1 - row * height,
                         x0 - column * width:x1 - column * width]
        return out

    def _decode_tile(self, index: int, chunk: int) -> np.ndarray:
        """File tile ``chunk`` of page ``index``, decoded (H×W×S); zeros where none was
        written, as zarr fills it."""
        page = self._jpeg_tiled[index]
        offset, count = page.dataoffsets[chunk], page.databytecounts[chunk]
        if not offset or not count:
            return np.zeros((page.tilelength, page.tilewidth, page.samplesperpixel), np.uint8)
        handle = self._tif.filehandle
        with handle.lock:  # one seek-and-read at a time on the shared handle
            handle.seek(offset)
            data = handle.read(count)
        # imagecodecs decodes with the GIL released: other threads decode meanwhile.
        decoded = page.decode(data, chunk, jpegtables=page.jpegtables,
                              jpegheader=page.jpegheader, _fullsize=True)[0]
        tile = decoded.reshape(page.tilelength, page.tilewidth, page.samplesperpixel)
        tile.flags.writeable = False  # shared by every region that touches it
        return tile

    @staticmethod
    def _jpeg_tiled_page(page: tifffile.TiffPage | None, plane: _Plane) -> tifffile.TiffPage | None:
        """``page`` if its regions can be cut from its own tiles: 8-bit JPEG tiles of
        interleaved samples, one plane deep, the same array zarr shows (else None)."""
        if page is None or not page.is_tiled or plane.planar:
            return None
        if (page.compression != tifffile.COMPRESSION.JPEG or page.dtype != np.uint8
                or page.imagedepth != 1 or page.tiledepth != 1
                or page.planarconfig != tifffile.PLANARCONFIG.CONTIG):
            return None
        shape = (page.imagelength, page.imagewidth, page.samplesperpixel)
        return page if tuple(plane.array.shape) == shape else None

    def _value_range(self, page: int) -> tuple[float, float]:
        """One 8-bit scaling per page, from a strided sample of the coarsest level."""
        if page not in self._value_ranges:
            plane = self._levels[-1] if self.pages == 1 else self._pages[page]
            array = plane.array
            width, height = plane.width_height
            step = max(1, math.ceil(max(width, height) / 1024))
            sample = array[:, ::step, ::step] if plane.planar else array[::step, ::step]
            self._value_ranges[page] = value_range_of(np.asarray(sample), self._scaling)
        return self._value_ranges[page]


class OpenSlideSlide(SlideReader):
    """Whole-slide images in vendor formats, through OpenSlide.

    Safe to read from several threads at once with one handle: the OpenSlide library
    documents its handles as thread-safe (it locks its own tile cache), and
    openslide-python calls it through ctypes, which releases the GIL for the call.
    """

    def __init__(self, path: Path) -> None:
        import openslide  # imported here: loading the C library is only needed for WSIs

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideUnreadable(f"OpenSlide cannot open it: {error}") from error
        self._error = openslide.OpenSlideError

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._slide.level_dimensions)

    def read_region(self, box: Box, *, level: int = 0, page: int = 0) -> np.ndarray:
        _check_index("page", page, 1)
        _check_index("level", level, self._slide.level_count)
        scale = self._slide.level_downsamples[level]
        location = (round(box.x0 * scale), round(box.y0 * scale))
        try:
            region = self._slide.read_region(location, level, (box.width, box.height))
        except self._error as error:
            raise SlideUnreadable(f"cannot read region {box.as_tuple()}: {error}") from error
        # Transparent pixels lie outside the scanned area: show them as white background.
        background = Image.new("RGBA", region.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, region).convert("RGB"))

    def close(self) -> None:
        self._slide.close()


Backend = Literal["openslide", "tiff", "pillow"]


def open_slide(path: Path, *, scaling: BitDepthScaling = "percentile",
               limits: ImageLimits | None = None) -> SlideReader:
    """The reader for ``path``, chosen by its content (see :func:`slide_backend`)."""
    backend = slide_backend(path)
    if backend == "openslide":
        return OpenSlideSlide(path)
    if backend == "tiff":
        return TiffSlide(path, scaling=scaling, limits=limits)
    return PillowSlide(path, scaling=scaling, limits=limits)


def slide_backend(path: Path) -> Backend:
    """Which reader takes ``path``, asking OpenSlide first, whatever the file's suffix.

    * Whatever OpenSlide recognises as a whole-slide format (Aperio, DICOM, Hamamatsu,
      MIRAX, Philips, Zeiss…: ``OpenSlide.detect_format``) goes to OpenSlide, so every
      format of the installed OpenSlide is read, named as it may be.
    * Other TIFFs go to tifffile, which also reads 16-bit, float and multi-page pages.
    * Files named as a whole-slide format that OpenSlide does not recognise go to it too,
      so the refusal says why (``OpenSlide cannot open it``).
    * Camera images (PNG, JPEG, BMP by their suffix) go to Pillow, which applies the image
      rules of :mod:`cellpipe.data.imageio` (so a JPEG named ``.tif`` is read as the JPEG it
      is, and a GIF named ``.png`` is refused).

    Anything else raises :class:`SlideUnreadable` ("unsupported slide format").
    """
    if not path.is_file():  # before any read: a FIFO would block OpenSlide and the rest
        raise SlideUnreadable(f"no such file: {path}")
    suffix = path.suffix.lower()
    vendor = _openslide_vendor(path)
    if vendor not in (None, "generic-tiff"):
        return "openslide"
    if is_tiff(path) and (vendor == "generic-tiff" or suffix in SLIDE_SUFFIXES):
        return "tiff"
    if suffix in OPENSLIDE_SUFFIXES - TIFF_SUFFIXES:
        return "openslide"
    if suffix in PILLOW_SUFFIXES | TIFF_SUFFIXES:
        return "pillow"
    raise SlideUnreadable(f"unsupported slide format '{suffix or path.name}' (neither "
                          f"OpenSlide nor tifffile reads it, and camera images need one of "
                          f"{', '.join(sorted(PILLOW_SUFFIXES))})")


def _openslide_vendor(path: Path) -> str | None:
    """OpenSlide's name for the file's format (``aperio``, ``dicom``…), None if unknown."""
    import openslide  # imported here: loading the C library is only needed for WSIs

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None


def _check_tiff_size(tif: tifffile.TiffFile, limits: ImageLimits) -> None:
    """The image rules' size bounds, from the header before any pixel is decoded: the
    shortest side, the whole page (up to a slide's size: regions are read lazily) and
    the largest piece decoded at once (a tile, or a strip of an untiled page), which is
    what a read holds in memory and what a lying header would blow up."""
    for page in usable_tiff_pages(tif):
        width, height = page.imagewidth, page.imagelength
        if min(width, height) < limits.min_side:
            raise SlideUnreadable(f"{width}x{height} is smaller than the minimum side of "
                                  f"{limits.min_side} px")
        if width * height > MAX_SLIDE_PIXELS:
            raise SlideUnreadable(f"{width}x{height} = {width * height:,} pixels exceeds the "
                                  f"limit of {MAX_SLIDE_PIXELS:,} for a slide")
        if page.is_tiled:
            piece, kind = page.tilewidth * page.tilelength, "tile"
        else:
            piece, kind = width * min(page.rowsperstrip or height, height), "untiled strip"
        if piece > limits.max_pixels:
            raise SlideUnreadable(f"one {kind} of {piece:,} pixels exceeds the limit of "
                                  f"{limits.max_pixels:,} decoded at once "
                                  f"({width}x{height} page)")


@dataclass(frozen=True)
class _Plane:
    """One page or pyramid level: its lazy array, and whether its samples are separate
    planes (S×H×W, as some scanners write RGB TIFFs) rather than interleaved (H×W×S)."""

    array: zarr.Array
    planar: bool

    @property
    def width_height(self) -> tuple[int, int]:
        if self.planar:
            return int(self.array.shape[2]), int(self.array.shape[1])
        return int(self.array.shape[1]), int(self.array.shape[0])


def _check_index(name: str, value: int, count: int) -> None:
    if not 0 <= value < count:
        raise ValueError(f"{name} {value} out of range: the slide has {count}")
