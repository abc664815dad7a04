"""A corpus of bad and unusual inputs, as a lab drops them into a source folder or an inbox.

:func:`generate` writes every kind into a folder and returns one :class:`Input` per file
written, each with what every entry point must do with it: accept it (and read the
picture it depicts: :attr:`Input.reference`) or refuse it with a reason matching a
pattern. Nothing is downloaded; every file is made here, most of them a few kB.

Entry points (:data:`ENTRY_POINTS`):

* ``ingest``: the ingest stage on a class-folder source (manifest or rejected.csv);
* ``score``: slide scoring of an inbox (scored, or quarantined with a reason);
* ``served``: :func:`cellpipe.contract.encoded_to_model_input` on the file's bytes, which
  the Triton preprocess model runs;
* ``triton``: ``cellpipe triton classify`` against a real local Triton.

Content kinds (``layer="content"``) are about the bytes and go through all four. Name
kinds (``layer="name"``) are about the file's name, its place or what it is on disk
(a link, a folder, a FIFO): only ingest and scoring see those, since the served entry
points take bytes.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

from slide_fixtures import smear

EntryPoint = Literal["ingest", "score", "served", "triton"]
ENTRY_POINTS: tuple[EntryPoint, ...] = ("ingest", "score", "served", "triton")
FILE_ENTRY_POINTS: tuple[EntryPoint, ...] = ("ingest", "score")
ACCEPTED = None  # an expectation: the entry point accepts the input and reads it right
# An expectation is ACCEPTED, a pattern its refusal's reason must match, or a tuple of
# those when either outcome is right (a name a file system may or may not take).
Expect = str | None | tuple[str | None, ...]

# Reasons, as patterns (re.search) over the entry points' messages.
EMPTY = r"empty (file|image) \(0 bytes\)"
NOT_AN_IMAGE = r"not a recognised image"
TRUNCATED = r"truncated or corrupt"
TOO_SMALL = r"smaller than the minimum side of 16 px"
TOO_LARGE = r"exceeds (the )?limit|decompression bomb"
HIDDEN = r"hidden file"
LINK_OUT = r"symbolic link to .*, outside the (source folder|inbox)"


@dataclass(frozen=True)
class Input:
    """One file (or link, folder entry…) of the corpus and what each entry point must do.

    ``expect`` maps an entry point to an :data:`Expect`; entry points absent from it do
    not apply. ``reference`` is the upright
    8-bit RGB picture an accepted input depicts (deeper inputs are stretched by their
    percentiles, so compare by correlation, not value).
    """

    kind: str
    path: str  # relative to the corpus folder, "/"-separated
    layer: Literal["content", "name"]
    expect: dict[str, Expect]
    reference: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Kind:
    """A kind of input: how to write it and what is expected of it."""

    name: str
    write: Callable[[Path, Path], list[Input]]  # (folder, outside) → the inputs written
    skip: Callable[[], str | None] = lambda: None  # why it cannot be made here, if so
    layer: Literal["content", "name"] = "content"

    @property
    def entry_points(self) -> tuple[EntryPoint, ...]:
        return ENTRY_POINTS if self.layer == "content" else FILE_ENTRY_POINTS


# --- images ----------------------------------------------------------------------------


@functools.cache
def picture(seed: int, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    """An RGB smear (H×W×3 uint8, read-only) with cells the scoring cell finder finds."""
    pixels = smear(size, seed=seed)[0]
    pixels.setflags(write=False)
    return pixels


def encode(pixels: np.ndarray | Image.Image, fmt: str, **options: object) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def tiff_bytes(pixels: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, **options)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def raw_gray_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A grey PNG written by hand: its header declares ``width``×``height``, its data holds
    ``rows`` black rows (all of them by default), streamed so huge ones cost no memory."""
    rows = height if rows is None else rows
    compressor, chunks = zlib.compressobj(9), []
    line = b"\x00" * (width + 1)  # filter byte + one black row
    for _ in range(rows):
        chunks.append(compressor.compress(line))
    chunks.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", b"".join(chunks)) + _png_chunk(b"IEND", b""))


def _stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """What a camera stores so that applying EXIF ``orientation`` gives ``upright``."""
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}[orientation]
    return np.asarray(Image.fromarray(upright).transpose(inverse))


def _gray(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(rgb.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)


def _patch_tiff_tag(data: bytes, tag: str, value: int) -> bytes:
    """``data`` with the first page's ``tag`` (a SHORT or LONG) set to ``value``."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        found = tif.pages[0].tags[tag]
        offset, dtype = found.valueoffset, found.dtype
    packed = struct.pack("<H" if dtype == 3 else "<I", value)
    return data[:offset] + packed + data[offset + len(packed):]


# --- kinds -----------------------------------------------------------------------------


def _content(name: str, file: str, data: Callable[[], bytes], refused: str | None = None, *,
             reference: Callable[[], np.ndarray] | None = None,
             per_entry: dict[str, str | None] | None = None,
             skip: Callable[[], str | None] = lambda: None) -> Kind:
    """A kind whose bytes decide: all four entry points expect the same (``per_entry``
    adjusts the reason's wording where an entry point words it its own way)."""

    def write(folder: Path, _: Path) -> list[Input]:
        (folder / file).write_bytes(data())
        expect = {entry: refused for entry in ENTRY_POINTS} | (per_entry or {})
        return [Input(name, file, "content", expect,
                      reference() if reference and refused is None else None)]

    return Kind(name, write, skip, "content")


def _tiff(name: str, file: str, pixels: Callable[[], np.ndarray], refused: str | None = None,
          *, reference: Callable[[], np.ndarray] | None = None, **options: object) -> Kind:
    return _content(name, file, lambda: tiff_bytes(pixels(), **options), refused,
                    reference=reference)


NameOutcome = str | np.ndarray | tuple[np.ndarray, str]


def _name_kind(name: str, files: Callable[[Path, Path], dict[str, NameOutcome]],
               skip: Callable[[], str | None] = lambda: None) -> Kind:
    """A kind about names or places: ``files`` writes them and returns, per path, what
    ingest and scoring expect: the reason's pattern, the picture an accepted file shows,
    or (picture, pattern) when accepting it and refusing it with that reason are both right.
    """

    def write(folder: Path, outside: Path) -> list[Input]:
        inputs = []
        for path, outcome in files(folder, outside).items():
            expect: Expect
            if isinstance(outcome, str):
                expect, reference = outcome, None
            elif isinstance(outcome, tuple):
                reference, pattern = outcome
                expect = (ACCEPTED, pattern)
            else:
                expect, reference = ACCEPTED, outcome
            inputs.append(Input(name, path, "name",
                                {entry: expect for entry in FILE_ENTRY_POINTS}, reference))
        return inputs

    return Kind(name, write, skip, "name")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _twelve_bit_jpeg() -> bytes:
    import imagecodecs

    deep = np.ascontiguousarray(picture(40)[..., 0].astype(np.uint16) * 16)  # 12-bit grey
    return bytes(imagecodecs.jpeg8_encode(deep, bitspersample=12))


def _cannot_make(make: Callable[[], bytes], what: str) -> Callable[[], str | None]:
    def skip() -> str | None:
        try:
            make()
        except Exception as error:  # noqa: BLE001 (a codec built without that mode)
            return f"imagecodecs cannot write {what} here: {type(error).__name__}: {error}"
        return None

    return skip


def _lossless_jpeg() -> bytes:
    import imagecodecs

    return bytes(imagecodecs.ljpeg_encode(picture(41)[..., 0]))


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(picture(seed)) for seed in (50, 51)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(_stored_for_orientation(picture(60 + orientation), orientation), "JPEG",
                  quality=95, exif=exif.tobytes())


def _palette_png() -> bytes:
    image = Image.fromarray(picture(70)).convert("P", palette=Image.Palette.ADAPTIVE)
    return encode(image, "PNG", transparency=0)


def _palette_png_reference() -> np.ndarray:
    image = Image.fromarray(picture(70)).convert("P", palette=Image.Palette.ADAPTIVE)
    return np.asarray(image.convert("RGB"))


def _huge_icc_jpeg() -> bytes:
    profile = np.random.default_rng(80).integers(0, 256, 2_000_000, dtype=np.uint8).tobytes()
    return encode(picture(80), "JPEG", quality=95, icc_profile=profile)


def _pyramid_tiff() -> bytes:
    base = picture(90, (256, 192))
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(base, subifds=2, tile=(64, 64), photometric="rgb")
        for factor in (2, 4):
            writer.write(base[::factor, ::factor], subfiletype=1, tile=(32, 32),
                         photometric="rgb")
    return buffer.getvalue()


def _page_without_data() -> bytes:
    """A 64×64 page whose one strip holds 0 bytes (the header promises what is not there)."""
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(shape=(64, 64), dtype=np.uint8)
    return buffer.getvalue()


def _huge_bigtiff() -> bytes:
    """A BigTIFF header declaring 100000×100000 px in one strip, and nothing after it: the
    header lies (as a cut-off download's does), and reading the strip could take 10 GB."""
    with tempfile.TemporaryDirectory(prefix="corpus-") as folder:
        path = Path(folder) / "huge.tif"
        with tifffile.TiffWriter(path, bigtiff=True) as writer:  # a sparse 10 GB file
            writer.write(shape=(100_000, 100_000), dtype=np.uint8, rowsperstrip=100_000)
        with tifffile.TiffFile(path) as tif:
            end = tif.pages[0].dataoffsets[0]
        with path.open("rb") as handle:
            return handle.read(end)


def _float_with_nan() -> np.ndarray:
    values = picture(100).astype(np.float32) / 255
    values[:10, :10] = np.nan
    return values


def _float_with_nan_reference() -> np.ndarray:
    rgb = picture(100).copy()
    rgb[:10, :10] = 0
    return rgb


def _cut(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


def _corrupt_png() -> bytes:
    data = bytearray(encode(picture(110), "PNG"))
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zeroes inside the image data: its CRC fails
    return bytes(data)


def _jpeg_with_trailing_garbage() -> bytes:
    return encode(picture(120), "JPEG", quality=95) + b"\x00garbage after the end marker" * 20


def _complex_tiff() -> np.ndarray:
    values = picture(130)[..., 0].astype(np.float32)
    return values + 1j * values


CONTENT_KINDS: list[Kind] = [
    # Not images, or not whole ones.
    _content("empty_file", "empty.png", lambda: b"", EMPTY),
    _content("truncated_jpeg", "truncated.jpg",
             lambda: _cut(encode(picture(1), "JPEG", quality=95), 0.5), TRUNCATED),
    _content("truncated_png", "truncated.png", lambda: _cut(encode(picture(2), "PNG"), 0.5),
             TRUNCATED),
    _content("truncated_tiff", "truncated.tif",
             lambda: _cut(tiff_bytes(picture(3), photometric="rgb"), 0.5), TRUNCATED),
    _content("tiff_header_only", "header_only.tif",
             lambda: tiff_bytes(picture(4), photometric="rgb")[:8], r"it has no image pages"),
    _content("corrupt_png_data", "corrupt.png", _corrupt_png, TRUNCATED),
    _content("text_named_jpg", "notes.jpg", lambda: b"lab notes, not an image\n" * 10,
             NOT_AN_IMAGE),
    _content("text_named_tif", "notes.tif", lambda: b"lab notes, not an image\n" * 10,
             NOT_AN_IMAGE),
    _content("html_error_page_named_png", "download.png",
             lambda: b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
                     b"<body><h1>Not Found</h1></body></html>\n", NOT_AN_IMAGE),
    _content("pdf_named_tif", "report.tif", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
             NOT_AN_IMAGE),
    _content("zeros_named_png", "zeros.png", lambda: bytes(4096), NOT_AN_IMAGE),
    _content("text_named_svs", "scan.svs", lambda: b"not a whole-slide image\n" * 10,
             NOT_AN_IMAGE, per_entry={"ingest": r"unsupported file type '\.svs'",
                                      "score": r"OpenSlide cannot open it"}),
    # Too small, or claiming to be too large.
    _content("one_pixel_png", "one_pixel.png", lambda: encode(np.zeros((1, 1, 3), np.uint8),
                                                              "PNG"), TOO_SMALL),
    _content("eight_pixel_jpeg", "eight_pixels.jpg",
             lambda: encode(picture(5)[:8, :8], "JPEG"), TOO_SMALL),
    _tiff("one_pixel_tiff", "one_pixel.tif", lambda: np.zeros((1, 1), np.uint8), TOO_SMALL),
    _content("thin_strip_png", "strip.png", lambda: encode(np.zeros((8, 4000, 3), np.uint8),
                                                           "PNG"), TOO_SMALL),
    _content("sixteen_pixel_png", "sixteen_pixels.png",
             lambda: encode(picture(6)[:16, :16], "PNG"), reference=lambda: picture(6)[:16, :16]),
    _content("png_lying_ihdr_huge", "lying_ihdr_huge.png",
             lambda: raw_gray_png(100_000, 100_000, rows=4), TOO_LARGE),
    # A complete compressed stream that holds fewer rows than the header declares: Pillow
    # (unlike libpng) reads the missing rows as black, so the file is a black 64×64 image.
    _content("png_ihdr_larger_than_data", "lying_ihdr.png",
             lambda: raw_gray_png(64, 64, rows=16),
             reference=lambda: np.zeros((64, 64, 3), np.uint8)),
    _content("decompression_bomb_png", "bomb.png", lambda: raw_gray_png(15_000, 15_000),
             TOO_LARGE),  # above twice the limit: Pillow's own guard refuses it
    _content("png_just_over_the_pixel_limit", "over_limit.png",
             lambda: raw_gray_png(12_000, 12_000), TOO_LARGE),  # 1.44e8 px: ours must
    _content("bigtiff_100000_squared_header", "huge_header.tif", _huge_bigtiff, TOO_LARGE),
    _content("tiff_zero_width_page", "zero_width.tif",
             lambda: _patch_tiff_tag(tiff_bytes(picture(7), photometric="rgb"),
                                     "ImageWidth", 0), TOO_SMALL),
    _content("tiff_page_without_data", "no_data.tif", _page_without_data,
             reference=lambda: np.zeros((64, 64, 3), np.uint8)),
    # TIFF sample layouts and types.
    _tiff("five_channel_tiff_planar", "five_planar.tif", lambda: np.zeros((5, 64, 64), np.uint8),
          r"channel count 5", photometric="minisblack", planarconfig="separate"),
    _tiff("five_channel_tiff_contig", "five_contig.tif", lambda: np.zeros((64, 64, 5), np.uint8),
          r"channel count 5", photometric="minisblack", planarconfig="contig"),
    _tiff("two_channel_tiff", "two_channel.tif",
          lambda: np.stack([picture(8)[..., 0], np.full((120, 160), 255, np.uint8)], -1),
          reference=lambda: np.repeat(picture(8)[..., :1], 3, 2), photometric="minisblack",
          planarconfig="contig"),
    _tiff("two_channel_tiff_planar", "two_planar.tif",
          lambda: np.stack([picture(36)[..., 0], np.full((120, 160), 255, np.uint8)]),
          reference=lambda: np.repeat(picture(36)[..., :1], 3, 2), photometric="minisblack",
          planarconfig="separate"),
    _tiff("planar_rgb_tiff", "planar_rgb.tif", lambda: np.moveaxis(picture(9), -1, 0),
          reference=lambda: picture(9), photometric="rgb", planarconfig="separate"),
    _tiff("float32_unit_range", "float32.tif", lambda: picture(10).astype(np.float32) / 255,
          reference=lambda: picture(10), photometric="rgb"),
    _tiff("float64_tiff", "float64.tif", lambda: picture(11).astype(np.float64) / 255,
          reference=lambda: picture(11), photometric="rgb"),
    _tiff("float_with_nan", "float_nan.tif", _float_with_nan,
          reference=_float_with_nan_reference, photometric="rgb"),
    _tiff("float_all_nan", "all_nan.tif", lambda: np.full((64, 64), np.nan, np.float32),
          r"no finite pixel values"),
    _tiff("complex_tiff", "complex.tif", _complex_tiff, r"unsupported pixel type complex"),
    _tiff("int32_tiff", "int32.tif", lambda: picture(12).astype(np.int32) * 1000 - 50_000,
          reference=lambda: picture(12), photometric="rgb"),
    _tiff("int8_signed_tiff", "int8.tif", lambda: (picture(13)[..., 0].astype(np.int16)
                                                   - 128).astype(np.int8),
          reference=lambda: np.repeat(picture(13)[..., :1], 3, 2)),
    _tiff("uint16_12_bit", "uint16_12bit.tif", lambda: picture(14).astype(np.uint16) * 16,
          reference=lambda: picture(14), photometric="rgb"),
    _tiff("bool_tiff", "bool.tif", lambda: picture(15)[..., 0] > 180,
          reference=lambda: np.repeat((picture(15)[..., :1] > 180).astype(np.uint8) * 255, 3,
                                      2)),
    _tiff("bigtiff", "big.tif", lambda: picture(16), reference=lambda: picture(16),
          photometric="rgb", bigtiff=True),
    _tiff("ome_tiff", "slide.ome.tif", lambda: picture(17), reference=lambda: picture(17),
          photometric="rgb", ome=True),
    _tiff("jpeg_compressed_tiff", "jpeg_in.tif", lambda: picture(18),
          reference=lambda: picture(18), photometric="rgb", compression="jpeg"),
    _tiff("lzw_tiff", "lzw.tif", lambda: picture(19), reference=lambda: picture(19),
          photometric="rgb", compression="lzw"),
    _tiff("tiled_tiff", "tiled.tif", lambda: picture(20, (256, 192)),
          reference=lambda: picture(20, (256, 192)), photometric="rgb", tile=(64, 64)),
    _content("tiled_pyramid_tiff", "pyramid.tif", _pyramid_tiff,
             reference=lambda: picture(90, (256, 192))),
    _tiff("multi_page_tiff", "pages.tif", lambda: np.stack([picture(21), picture(22)]),
          reference=lambda: picture(21), photometric="rgb"),
    # JPEG variants.
    _content("twelve_bit_jpeg", "twelve_bit.jpg", _twelve_bit_jpeg,
             r"12-bit JPEG is not supported",
             skip=_cannot_make(_twelve_bit_jpeg, "a 12-bit JPEG")),
    _content("lossless_jpeg", "lossless.jpg", _lossless_jpeg,
             reference=lambda: np.repeat(picture(41)[..., :1], 3, 2),
             skip=_cannot_make(_lossless_jpeg, "a lossless JPEG")),
    _content("huge_icc_profile_jpeg", "icc.jpg", _huge_icc_jpeg, reference=lambda: picture(80)),
    *[_content(f"exif_orientation_{k}", f"exif_{k}.jpg", lambda k=k: _exif_jpeg(k),
               reference=lambda k=k: picture(60 + k)) for k in range(2, 9)],
    _content("cmyk_jpeg", "cmyk.jpg",
             lambda: encode(Image.fromarray(picture(23)).convert("CMYK"), "JPEG", quality=95),
             reference=lambda: picture(23)),
    _content("progressive_jpeg", "progressive.jpg",
             lambda: encode(picture(24), "JPEG", quality=95, progressive=True),
             reference=lambda: picture(24)),
    _content("grayscale_jpeg", "gray.jpg", lambda: encode(_gray(picture(25))[..., 0], "JPEG"),
             reference=lambda: _gray(picture(25))),
    _content("jpeg_trailing_garbage", "trailing.jpg", _jpeg_with_trailing_garbage,
             reference=lambda: picture(120)),
    _content("jpeg_named_tif", "camera.tif", lambda: encode(picture(26), "JPEG", quality=95),
             reference=lambda: picture(26)),
    # PNG and other formats.
    _content("palette_png_transparency", "palette.png", _palette_png,
             reference=_palette_png_reference),
    _content("sixteen_bit_png", "deep.png",
             lambda: encode(picture(27)[..., 0].astype(np.uint16) * 257, "PNG"),
             reference=lambda: np.repeat(picture(27)[..., :1], 3, 2)),
    _content("gray_alpha_png", "gray_alpha.png",
             lambda: encode(Image.fromarray(_gray(picture(28))).convert("LA"), "PNG"),
             reference=lambda: _gray(picture(28))),
    _content("rgba_png", "rgba.png",
             lambda: encode(np.dstack([picture(29), np.full((120, 160), 128, np.uint8)]),
                            "PNG"), reference=lambda: picture(29)),
    _content("png_named_jpg", "really_png.jpg", lambda: encode(picture(30), "PNG"),
             reference=lambda: picture(30)),
    _content("bmp", "old_scope.bmp", lambda: encode(picture(31), "BMP"),
             reference=lambda: picture(31)),
    _content("animated_gif", "animated.gif", lambda: _animated("GIF"),
             r"unsupported (image format GIF|file type '\.gif'|slide format '\.gif')"),
    _content("animated_png", "animated.png", lambda: _animated("PNG"),
             r"animated PNG with 2 frames"),
    _content("gif_named_png", "still_gif.png", lambda: encode(picture(32), "GIF"),
             r"unsupported image format GIF"),
    _content("webp", "phone.webp", lambda: encode(picture(33), "WEBP"),
             r"unsupported (image format WEBP|file type '\.webp'|slide format '\.webp')"),
    _content("webp_named_jpg", "phone.jpg", lambda: encode(picture(34), "WEBP"),
             r"unsupported image format WEBP"),
    _content("jpeg2000_named_tif", "scanner.tif", lambda: encode(picture(35), "JPEG2000"),
             r"unsupported image format JPEG2000"),
]


# --- names, places and file types -------------------------------------------------------


def _good(folder: Path, relative: str, seed: int) -> dict[str, np.ndarray]:
    """A good image at ``relative``: {relative: the picture it shows}."""
    _write(folder / relative, encode(picture(seed), "PNG"))
    return {relative: picture(seed)}


def _links_out(folder: Path, outside: Path) -> dict[str, NameOutcome]:
    target = _write(outside / "private.png", encode(picture(200), "PNG"))
    (folder / "link_out.png").symlink_to(target)
    (folder / "link_to_passwd.png").symlink_to("/etc/passwd")
    (folder / "linked_folder").symlink_to(outside, target_is_directory=True)
    return {"link_out.png": LINK_OUT, "link_to_passwd.png": LINK_OUT, "linked_folder": LINK_OUT}


def _link_inside(folder: Path, _: Path) -> dict[str, NameOutcome]:
    found = _good(folder, "link_target.png", 201)
    (folder / "link_inside.png").symlink_to(folder / "link_target.png")
    return found | {"link_inside.png": picture(201)}


def _broken_links(folder: Path, outside: Path) -> dict[str, NameOutcome]:
    (folder / "broken_inside.png").symlink_to(folder / "was_deleted.png")
    (folder / "broken_outside.png").symlink_to(outside / "was_deleted.png")
    return {"broken_inside.png": r"cannot read file|[Nn]o such file",
            "broken_outside.png": LINK_OUT}


def _hidden(folder: Path, _: Path) -> dict[str, NameOutcome]:
    paths = [*_good(folder, ".hidden.png", 210), *_good(folder, "..dotdot.png", 211),
             *_good(folder, ".thumbs/small.png", 212)]
    _write(folder / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    return {path: HIDDEN for path in [*paths, ".DS_Store"]}


def _collisions(folder: Path, _: Path) -> dict[str, NameOutcome]:
    """Two good and two broken files whose names sanitise alike: four outcomes, not two."""
    broken = _cut(encode(picture(220), "JPEG"), 0.4)
    _write(folder / "dup" / "trunc.jpg", broken)
    _write(folder / "dup_trunc.jpg", broken[:-10])
    return (_good(folder, "pair/slide 1.png", 221) | _good(folder, "pair_slide_1.png", 222)
            | {"dup/trunc.jpg": TRUNCATED, "dup_trunc.jpg": TRUNCATED})


def _folder_named_like_an_image(folder: Path, _: Path) -> dict[str, NameOutcome]:
    (folder / "empty_folder.png").mkdir()  # no file: nothing to list
    return _good(folder, "folder.png/inner.png", 230)


def _fifo(folder: Path, _: Path) -> dict[str, NameOutcome]:
    os.mkfifo(folder / "pipe.png")
    return {"pipe.png": r"not a regular file|FIFO"}


def _unreadable(folder: Path, _: Path) -> dict[str, NameOutcome]:
    _good(folder, "locked.png", 240)
    (folder / "locked.png").chmod(0)
    return {"locked.png": r"cannot read file|[Pp]ermission denied"}


def _unreadable_skip() -> str | None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "running as root, which reads any file whatever its permissions"
    return None


def _long_names(folder: Path, _: Path) -> dict[str, NameOutcome]:
    """Names of 204, 234 and 255 bytes (the most ext4, xfs or btrfs take). Results and
    quarantine records are named after the slide, plus a hash and the model: a name the
    results disk then refuses may be quarantined with that reason, never stop a batch."""
    too_long = r"[Ff]ile name too long"
    return _good(folder, "L" * 200 + ".png", 250) | {
        path: (pixels, too_long) for path, pixels in
        (_good(folder, "M" * 230 + ".png", 251) | _good(folder, "N" * 251 + ".png", 252)).items()}


def _non_utf8_name(folder: Path, _: Path) -> dict[str, NameOutcome]:
    """A name in Latin-1, from an old Windows share: used, or refused with the reason."""
    found = _good(folder, os.fsdecode(b"Pr\xe4parat_latin1.png"), 260)
    return {path: (pixels, r"UTF-8") for path, pixels in found.items()}


def _suffixes(folder: Path, _: Path) -> dict[str, NameOutcome]:
    _write(folder / "no_suffix", encode(picture(270), "PNG"))
    _write(folder / "notes.txt", b"stain batch 7\n")
    return _good(folder, "UPPER.PNG", 271) | {
        "no_suffix": r"unsupported (file type '\(none\)'|slide format 'no_suffix')",
        "notes.txt": r"unsupported (file type|slide format) '\.txt'"}


NAME_KINDS: list[Kind] = [
    _name_kind("unicode_name", lambda f, _: _good(f, "Präparat_血液_µm_🔬.png", 280)),
    _name_kind("spaces_in_name", lambda f, _: _good(f, " slide  with spaces .png", 281)),
    _name_kind("odd_characters_in_name",
               lambda f, _: _good(f, "slide [1] #2 50% & 'x' $HOME;*?.png", 282)),
    _name_kind("long_names", _long_names),
    _name_kind("non_utf8_name", _non_utf8_name),
    _name_kind("names_colliding_after_sanitising", _collisions),
    _name_kind("hidden_files", _hidden),
    _name_kind("symlink_out_of_the_folder", _links_out),
    _name_kind("symlink_inside_the_folder", _link_inside),
    _name_kind("broken_symlinks", _broken_links),
    _name_kind("folder_named_like_an_image", _folder_named_like_an_image),
    _name_kind("fifo", _fifo),
    _name_kind("unreadable_by_permissions", _unreadable, skip=_unreadable_skip),
    _name_kind("suffixes", _suffixes),
]

KINDS: list[Kind] = CONTENT_KINDS + NAME_KINDS


def skipped() -> dict[str, str]:
    """Kinds this machine cannot make, and why."""
    return {kind.name: reason for kind in KINDS if (reason := kind.skip()) is not None}


def generate(folder: Path, outside: Path, *, kinds: list[Kind] | None = None) -> list[Input]:
    """Write every kind into ``folder`` (links point to ``outside``, which must lie outside
    the source folder or inbox); return what was written, with its expectations."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    inputs: list[Input] = []
    for kind in KINDS if kinds is None else kinds:
        if kind.skip() is None:
            inputs += kind.write(folder, outside)
    names = [item.path for item in inputs]
    assert len(names) == len(set(names)), "two kinds wrote one path"
    return inputs


def neighbours(folder: Path, count: int, *, first_seed: int = 500) -> list[Input]:
    """Good slides beside the corpus: none of them may be lost to a bad neighbour."""
    inputs = []
    for number in range(count):
        path = f"neighbour_{number:02d}.png"
        _write(folder / path, encode(picture(first_seed + number), "PNG"))
        inputs.append(Input("good_neighbour", path, "content",
                            {entry: ACCEPTED for entry in ENTRY_POINTS},
                            picture(first_seed + number)))
    return inputs


# --- running the corpus through the entry points ----------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one entry point did with one input.

    ``status``: accepted (scored, in the manifest, a tensor), refused (with ``reason``),
    traceback (an exception that is not a clean refusal: ``reason`` holds it) or missing
    (the entry point neither used it nor said why). ``pixels`` is what an accepted input
    was read as, when the entry point exposes it; ``size`` its (width, height).
    """

    status: Literal["accepted", "refused", "traceback", "missing"]
    reason: str = ""
    size: tuple[int, int] | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)


def agrees(expected: Expect, outcome: Outcome) -> bool:
    """Whether ``outcome`` is what ``expected`` asks for."""
    import re

    if isinstance(expected, tuple):
        return any(agrees(alternative, outcome) for alternative in expected)
    if expected is ACCEPTED:
        return outcome.status == "accepted"
    return outcome.status == "refused" and re.search(expected, outcome.reason) is not None


def reads_as(reference: np.ndarray, pixels: np.ndarray) -> bool:
    """Whether decoded ``pixels`` show ``reference``: the same shape (so upright), and
    the same picture up to a monotonic stretch and JPEG noise (correlation of grey)."""
    if pixels.shape != reference.shape:
        return False
    first = reference.astype(np.float64).mean(axis=2).ravel()
    second = pixels.astype(np.float64).mean(axis=2).ravel()
    if first.std() == 0 or second.std() == 0:
        return bool(np.abs(first - second).max() <= 2)
    return bool(np.corrcoef(first, second)[0, 1] > 0.95)


def run_ingest(source: Path, out: Path, inputs: list[Input], label: str) -> dict[str, Outcome]:
    """The ingest stage on ``source`` (class folders; the corpus in ``source/label``): each
    input is in the manifest (its pixels read as preprocess reads them) or in rejected.csv."""
    import traceback

    import pandas as pd

    from cellpipe.data.imageio import ImageRejected, read_rgb
    from cellpipe.stages.ingest import IngestParams, run

    try:
        run(source, out, IngestParams(max_rejected_fraction=1.0), workers=1)
        manifest = pd.read_parquet(out / "manifest.parquet")
        rejected = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    except Exception:  # noqa: BLE001 (the stage itself crashed: every input suffers)
        crash = traceback.format_exc()
        return {item.path: Outcome("traceback", crash) for item in inputs}
    rows = {path: row for path, row in zip(manifest["path"], manifest.itertuples(),
                                           strict=True)}
    reasons: dict[str, list[str]] = {}
    for path, reason in zip(rejected["path"], rejected["reason"], strict=True):
        reasons.setdefault(path, []).append(reason)
    outcomes = {}
    for item in inputs:
        key = f"{label}/{item.path}"
        if key in rows:
            row = rows[key]
            try:
                pixels = read_rgb(source / key, int(row.page))
            except ImageRejected as error:
                outcomes[item.path] = Outcome("refused", f"in the manifest, yet: {error}")
                continue
            except Exception:  # noqa: BLE001
                outcomes[item.path] = Outcome("traceback", traceback.format_exc())
                continue
            outcomes[item.path] = Outcome("accepted", size=(int(row.width), int(row.height)),
                                          pixels=pixels)
        elif shown_name(key) in reasons:  # a name that is not UTF-8 is listed as shown
            outcomes[item.path] = Outcome("refused", "; ".join(reasons[shown_name(key)]))
        else:
            outcomes[item.path] = Outcome("missing")
    return outcomes


def shown_name(name: str) -> str:
    """A file name as a report can hold it: undecodable bytes as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def run_score(inbox: Path, out: Path, inputs: list[Input], *, delay_s: float = 0.0
              ) -> dict[str, Outcome]:
    """score_inbox on ``inbox`` with the colour-rule classifier: each input scored (its
    size from the result's summary) or quarantined with its reason."""
    import json
    import traceback

    from cellpipe.data.geometry import Box
    from cellpipe.slides.batch import ModelKey, score_inbox
    from cellpipe.slides.cells import CellFinderParams
    from cellpipe.slides.readers import open_slide
    from cellpipe.slides.scoring import ScoreParams
    from slide_fixtures import ColourRuleClassifier

    try:
        report = score_inbox(str(inbox), out, ColourRuleClassifier(delay_s=delay_s),
                             ScoreParams(cells=CellFinderParams(cell_diameter=40)),
                             ModelKey("colour_rules", "1"))
    except Exception:  # noqa: BLE001 (the batch itself crashed: every input suffers)
        crash = traceback.format_exc()
        return {item.path: Outcome("traceback", crash) for item in inputs}
    slides = {slide["slide"]: slide for slide in report["slides"]}
    outcomes = {}
    for item in inputs:
        slide = slides.get(item.path)
        if slide is None:
            outcomes[item.path] = Outcome("missing")
        elif slide["status"] in ("quarantined", "ignored"):  # each with its reason
            outcomes[item.path] = Outcome("refused", slide["reason"])
        else:
            summary = json.loads((out / slide["result"] / "summary.json").read_text())
            with open_slide(inbox / item.path) as reader:  # the pixels scoring read
                width, height = reader.dimensions
                pixels = reader.read_region(Box(0, 0, width, height))
            outcomes[item.path] = Outcome("accepted", size=(summary["width"], summary["height"]),
                                          pixels=pixels)
    return outcomes


SERVED_CONTRACT_SIZE = 16


def run_served(folder: Path, inputs: list[Input]) -> dict[str, Outcome]:
    """encoded_to_model_input (the Triton preprocess model's code) on each file's bytes."""
    import traceback

    from cellpipe.contract import ModelContract, encoded_to_model_input
    from cellpipe.data.imageio import ImageRejected, decode_rgb

    contract = ModelContract(class_names=("a", "b"), image_size=SERVED_CONTRACT_SIZE,
                             mean=(0.5,) * 3, std=(0.5,) * 3)
    outcomes = {}
    for item in inputs:
        data = (folder / item.path).read_bytes()
        try:
            tensor = encoded_to_model_input([data], contract)
            pixels = decode_rgb(data)
        except ImageRejected as error:
            outcomes[item.path] = Outcome("refused", str(error))
            continue
        except Exception:  # noqa: BLE001
            outcomes[item.path] = Outcome("traceback", traceback.format_exc())
            continue
        if tensor.shape != (1, 3, SERVED_CONTRACT_SIZE, SERVED_CONTRACT_SIZE) or \
                not np.isfinite(tensor).all():
            outcomes[item.path] = Outcome("traceback", f"bad tensor {tensor.shape}")
            continue
        outcomes[item.path] = Outcome("accepted", size=(pixels.shape[1], pixels.shape[0]),
                                      pixels=pixels)
    return outcomes


@dataclass(frozen=True)
class CliRun:
    """One ``cellpipe triton classify`` run: per-file outcomes, its exit status and stderr."""

    outcomes: dict[str, Outcome]
    returncode: int
    stderr: str
    seconds: float


def run_triton(folder: Path, inputs: list[Input], grpc_url: str, *, timeout_s: float = 300
               ) -> CliRun:
    """``cellpipe triton classify`` on every input, in a subprocess as a user runs it: a
    file is accepted when it has a line in stdout, refused when stderr says why."""
    import subprocess
    import sys
    import time

    paths = {item.path: str(folder / item.path) for item in inputs}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "cellpipe", "triton", "classify", "--url",
                          grpc_url, *paths.values()], capture_output=True, text=True,
                         timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.monotonic() - started
    classified = {line.split("\t")[0] for line in run.stdout.splitlines() if "\t" in line}
    outcomes = {}
    for relative, path in paths.items():
        marker = f"rejected {path}: "
        if path in classified:
            outcomes[relative] = Outcome("accepted")
        elif marker in run.stderr:
            reason = run.stderr.split(marker, 1)[1].split("\n", 1)[0]
            outcomes[relative] = Outcome("refused", reason)
        else:
            outcomes[relative] = Outcome("missing")
    return CliRun(outcomes, run.returncode, run.stderr, seconds)


def check(item: Input, entry: str, outcome: Outcome) -> str | None:
    """What is wrong with ``outcome`` for ``item`` at ``entry``, or None when it is right:
    expected, never a traceback or a silent skip, and an accepted input read as the
    picture it shows (upright, the right size)."""
    expected = item.expect[entry]
    if outcome.status in ("traceback", "missing"):
        detail = outcome.reason.strip().splitlines()[-1:] if outcome.reason else []
        return f"{outcome.status}{': ' + detail[0] if detail else ''}"
    if not agrees(expected, outcome):
        return f"expected {expected or 'accepted'!r}, got {outcome.status}: {outcome.reason}"
    if outcome.status == "accepted" and item.reference is not None:
        height, width = item.reference.shape[:2]
        if outcome.size is not None and outcome.size != (width, height):
            return f"read as {outcome.size[0]}x{outcome.size[1]}, not {width}x{height}"
        if outcome.pixels is not None and not reads_as(item.reference, outcome.pixels):
            return f"read as other pixels ({outcome.pixels.shape}): not the picture it shows"
    return None


# Inputs that today make an entry point crash, stop or hang as a whole, found by this
# corpus; each is run on its own (with good neighbours) until it is fixed, so that it
# cannot hide what the rest of the corpus shows. The tests expect them to fail (strict:
# once fixed, they pass, and the entry here must go).
KNOWN_DEFECTS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class EntryRun:
    """The corpus (or some kinds of it) through one entry point."""

    entry: str
    root: Path  # holds source/ (ingest) or inbox/, and out/
    inputs: list[Input]
    outcomes: dict[str, Outcome]
    seconds: float
    hung: bool = False  # scoring blocked on a FIFO until the run opened its other end

    def problems(self) -> dict[str, str]:
        """Input path → what is wrong, for every input handled wrongly."""
        found = {item.path: check(item, self.entry, self.outcomes[item.path])
                 for item in self.inputs}
        if self.hung:
            found["(the run)"] = "blocked on a FIFO until the test opened its other end"
        return {path: problem for path, problem in found.items() if problem}


def run_entry(entry: str, root: Path, kinds: list[Kind], *, neighbour_count: int = 3,
              fifo_timeout_s: float = 10.0) -> EntryRun:
    """Write ``kinds`` and good neighbours under ``root`` and run them through ``entry``
    (ingest, score or served; ``triton`` needs a server: :func:`run_triton`)."""
    import time

    applicable = [kind for kind in kinds if entry in kind.entry_points]
    if entry == "ingest":
        source = root / "source"
        inputs = generate(source / "a", root / "outside", kinds=applicable)
        inputs += neighbours(source / "a", neighbour_count)
        neighbours(source / "b", neighbour_count, first_seed=600)  # a second class
        started = time.monotonic()
        outcomes = run_ingest(source, root / "out", inputs, "a")
        return EntryRun(entry, root, inputs, outcomes, time.monotonic() - started)
    folder = root / "inbox"
    inputs = generate(folder, root / "outside", kinds=applicable)
    inputs += neighbours(folder, neighbour_count)
    started = time.monotonic()
    if entry == "served":
        outcomes = run_served(folder, inputs)
        return EntryRun(entry, root, inputs, outcomes, time.monotonic() - started)
    if entry != "score":
        raise ValueError(f"unknown entry point {entry!r}")
    with _unblock_fifos(folder, fifo_timeout_s) as hung:
        outcomes = run_score(folder, root / "out", inputs)
    return EntryRun(entry, root, inputs, outcomes, time.monotonic() - started,
                    hung=bool(hung))


class _unblock_fifos:  # noqa: N801 (a context manager, used like a function)
    """From ``seconds`` into the run on, open the write end of any FIFO in ``folder`` that a
    reader waits on, and close it, so that the reader sees an end of file and the run
    goes on; the list it yields names the FIFOs it had to open (none: nothing blocked)."""

    def __init__(self, folder: Path, seconds: float) -> None:
        import threading

        self.folder, self.seconds, self.fired = folder, seconds, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import stat

        if self.stop.wait(self.seconds):
            return
        fifos = [path for path in self.folder.rglob("*")
                 if not path.is_symlink() and stat.S_ISFIFO(path.lstat().st_mode)]
        while not self.stop.wait(0.2):
            for path in fifos:
                try:  # succeeds only while a reader has it open
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    self.fired.append(path)
                except OSError:
                    pass

    def __enter__(self) -> list[Path]:
        self.thread.start()
        return self.fired

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
