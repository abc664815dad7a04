"""Generated DICOM whole-slide images that OpenSlide 4 opens, written by the tests themselves.

One file per pyramid level, all of one series (OpenSlide's DICOM driver finds the other
levels by SeriesInstanceUID in the folder of the file it opens). What the driver needs
(openslide ``src/openslide-vendor-dicom.c``): a Part 10 file whose file meta says VL Whole
Slide Microscopy Image Storage; ImageType ``ORIGINAL\\PRIMARY\\VOLUME\\NONE`` (level 0) or
``DERIVED\\PRIMARY\\VOLUME\\RESAMPLED`` (lower levels); a transfer syntax it decodes (here
explicit VR little endian: uncompressed, so pixels read back exactly); 8-bit RGB with
PlanarConfiguration 0; TotalPixelMatrixColumns/Rows and tile Columns/Rows; TILED_FULL
frames, row by row, edge tiles padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
LEVEL_0_TYPE = ("ORIGINAL", "PRIMARY", "VOLUME", "NONE")
RESAMPLED_TYPE = ("DERIVED", "PRIMARY", "VOLUME", "RESAMPLED")
LABEL_TYPE = ("ORIGINAL", "PRIMARY", "LABEL", "NONE")


def write_dicom_wsi(folder: Path, image: np.ndarray, *, levels: int = 2, tile: int = 128,
                    stem: str = "level", series: str | None = None) -> list[Path]:
    """``image`` (H×W×3 uint8) as a DICOM WSI of ``levels`` levels, each halving the last,
    in ``folder/<stem>-<level>.dcm``; returns the files, level 0 first."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study = series or generate_uid(), generate_uid()
    files = []
    for level in range(levels):
        pixels = image[::2 ** level, ::2 ** level]
        path = folder / f"{stem}-{level}.dcm"
        write_dicom_image(path, pixels, series=series, study=study, tile=tile,
                          image_type=LEVEL_0_TYPE if level == 0 else RESAMPLED_TYPE)
        files.append(path)
    return files


def write_dicom_image(path: Path, pixels: np.ndarray, *, series: str, study: str,
                      tile: int = 128, image_type: Sequence[str] = LEVEL_0_TYPE) -> Path:
    """One DICOM WSI file: ``pixels`` cut into TILED_FULL uncompressed RGB frames."""
    height, width = pixels.shape[:2]
    across, down = -(-width // tile), -(-height // tile)
    padded = np.zeros((down * tile, across * tile, 3), np.uint8)
    padded[:height, :width] = pixels
    # Frames row by row, each tile×tile×3: (down, tile, across, tile, 3) → (down, across, …).
    frames = padded.reshape(down, tile, across, tile, 3).swapaxes(1, 2)
    instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = WSI_SOP_CLASS, instance
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
    dataset.Modality = "SM"
    dataset.ImageType = list(image_type)
    dataset.Rows = dataset.Columns = tile
    dataset.TotalPixelMatrixColumns, dataset.TotalPixelMatrixRows = width, height
    dataset.TotalPixelMatrixFocalPlanes = 1
    dataset.NumberOfFrames = across * down
    dataset.DimensionOrganizationType = "TILED_FULL"
    dataset.NumberOfOpticalPaths = 1
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 3, "RGB"
    dataset.PlanarConfiguration = 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.ascontiguousarray(frames).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path
