"""A DICOM whole-slide image is a folder of files that make one slide: find them in an inbox.

DICOM WSI (VL Whole Slide Microscopy Image Storage) keeps every pyramid level, and the
label, overview and thumbnail images, in a file of its own; all files of one slide share
its SeriesInstanceUID. OpenSlide opens any one of them and reads the others it finds in
the same folder. So the inbox scores the files of one series in one folder as one slide:

* it is opened from, and named after, its full-resolution level's file (the largest
  ``ORIGINAL``/``DERIVED`` ``VOLUME`` image), e.g. ``case-7/level-0.dcm``: a path unique to
  the series (two slides scanned into one folder keep two names) that a person can open
  in a viewer;
* its other files travel with it: they are copied with it out of a remote inbox, and its
  content hash (what "already scored" is decided by) covers all of them.

Only files OpenSlide would read as part of a slide are grouped: readable DICOM headers
of the WSI class with a series UID. Anything else (a broken .dcm, a CT image) stays a
slide of its own, which the batch quarantines with OpenSlide's reason.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec

from cellpipe.fsutil import file_sha256
from cellpipe.slides.readers import SLIDE_SUFFIXES

log = logging.getLogger(__name__)

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
DICOM_SUFFIX = ".dcm"
# A DICOM Part 10 file: a 128-byte preamble, then these 4 bytes.
_PREAMBLE, _MAGIC = 128, b"DICM"
# Files named as another slide format are never read for a DICOM header, so an inbox of
# camera images or vendor slides costs no extra read (a remote inbox: no extra request).
# A dual-personality DICOM-TIFF named .tif is read by OpenSlide as a TIFF too.
_NOT_DICOM_SUFFIXES = SLIDE_SUFFIXES - {DICOM_SUFFIX}
# The header elements grouping needs; pydicom parses no others.
_TAGS = ("SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows")


@dataclass(frozen=True)
class DicomHeader:
    """What grouping needs from one DICOM WSI file."""

    series: str          # SeriesInstanceUID: one slide
    level_pixels: int    # pixels of the pyramid level it holds; 0 for a label, overview…


def dicom_series(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The multi-file DICOM slides among ``paths`` (fsspec paths on ``fs``).

    Returns, for each series of two or more files in one folder, the path of the file the
    slide is opened from (its full-resolution level) and the paths of its other files,
    sorted. Files of no such series are not in the result.
    """
    series: dict[tuple[str, str], list[tuple[str, DicomHeader]]] = defaultdict(list)
    for path in paths:
        header = read_dicom_header(fs, path)
        if header is not None:
            # OpenSlide looks for a slide's files in the folder of the one it opens only.
            series[(path.rpartition("/")[0], header.series)].append((path, header))
    groups = {}
    for members in series.values():
        if len(members) < 2:
            continue
        main = min(members, key=lambda member: (-member[1].level_pixels, member[0]))[0]
        groups[main] = tuple(sorted(path for path, _ in members if path != main))
        log.debug("%s: one DICOM slide with %s", main, ", ".join(groups[main]))
    return groups


def read_dicom_header(fs: fsspec.AbstractFileSystem, path: str) -> DicomHeader | None:
    """The header of a DICOM WSI file (its pixels are not read); None for any other file,
    including one that cannot be read: it is scored, and refused, on its own."""
    if Path(path).suffix.lower() in _NOT_DICOM_SUFFIXES:
        return None
    try:
        with fs.open(path, "rb") as handle:
            if handle.read(_PREAMBLE + len(_MAGIC))[_PREAMBLE:] != _MAGIC:
                return None
            handle.seek(0)
            return _header(handle)
    except Exception:  # noqa: BLE001 (pydicom and fsspec backends raise many types)
        log.debug("%s: no readable DICOM header", path, exc_info=True)
        return None


def _header(handle: object) -> DicomHeader | None:
    """A WSI header from an open DICOM file, None for another class or without a series."""
    # Imported here: pydicom takes ~0.7 s to import, and most inboxes hold no DICOM.
    import pydicom

    with warnings.catch_warnings():  # pydicom logs what it warns of: say it once
        warnings.simplefilter("ignore", UserWarning)
        dataset = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=list(_TAGS))
    sop_class = dataset.file_meta.get("MediaStorageSOPClassUID")
    series = dataset.get("SeriesInstanceUID")
    if sop_class != WSI_SOP_CLASS or not series:
        return None
    image_type = [str(value).upper() for value in dataset.get("ImageType") or ()]
    is_level = len(image_type) > 2 and image_type[2] == "VOLUME"
    pixels = (int(dataset.get("TotalPixelMatrixColumns") or 0)
              * int(dataset.get("TotalPixelMatrixRows") or 0)) if is_level else 0
    return DicomHeader(str(series), pixels)


def slide_sha256(path: Path, others: Sequence[Path] = ()) -> str:
    """The content hash of a slide: its file's sha256, or for a slide of several files the
    sha256 of all their sha256s, sorted, so it changes when any file changes but not with
    the file names or which file opens the slide."""
    if not others:
        return file_sha256(path)  # one file: the hash results were always named by
    digests = sorted(file_sha256(file) for file in (path, *others))
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()
