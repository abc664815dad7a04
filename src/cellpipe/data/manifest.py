"""The manifest: one table per data set version that every later stage reads.

One row per model input: a whole image, one page of a multi-page TIFF, or one
object cropped from an annotated slide. Later stages never walk the source
folders; they read this table. The ordered class list travels inside the
Parquet file's metadata, so the table alone says what label index 0 means, and so
does the crop geometry of annotated objects, which the model contract carries on
to scoring.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellpipe.data.geometry import CropGeometry
from cellpipe.data.sources import Rejection
from cellpipe.fsutil import atomic_path

# Column → pandas dtype. Box columns are empty for whole-image rows.
COLUMNS: dict[str, str] = {
    "path": "string",       # relative to the source folder, POSIX separators
    "page": "int32",        # TIFF page (0 for single-page files)
    "x0": "Int32", "y0": "Int32", "x1": "Int32", "y1": "Int32",  # crop box, if a crop
    "sha256": "string",     # of the whole source file
    "label": "string",      # class name; empty for unlabeled rows
    "source_id": "string",  # slide / group: rows sharing it are in one split
    "split": "string",      # train | val | test | unlabeled
    "width": "int32",       # of the model input before resize (crop or page)
    "height": "int32",
}
_METADATA_KEY = b"cellpipe"


@dataclass(frozen=True)
class Manifest:
    """The manifest table, its ordered class list, and how its crops were cut."""

    rows: pd.DataFrame
    classes: tuple[str, ...]
    # None when the source gave whole images (already crops, or tiles): nothing was cut.
    crop: CropGeometry | None = None

    def label_index(self) -> pd.Series:
        """Integer label per row (position in ``classes``), -1 for unlabeled rows."""
        lookup = {name: index for index, name in enumerate(self.classes)}
        return self.rows["label"].map(lookup).fillna(-1).astype("int16")


def empty_rows() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in COLUMNS.items()})


def conform(rows: pd.DataFrame) -> pd.DataFrame:
    """Columns in contract order with contract dtypes; extra columns are an error."""
    extra = set(rows.columns) - set(COLUMNS)
    if extra:
        raise ValueError(f"manifest has columns outside the contract: {sorted(extra)}")
    return rows.reindex(columns=list(COLUMNS)).astype(COLUMNS).reset_index(drop=True)


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write the manifest to Parquet atomically, with the class list in its metadata."""
    table = pa.Table.from_pandas(conform(manifest.rows), preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    crop = asdict(manifest.crop) if manifest.crop else None
    metadata[_METADATA_KEY] = json.dumps({"classes": list(manifest.classes),
                                          "crop": crop}).encode()
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp)


def read_manifest(path: Path) -> Manifest:
    """Read a manifest written by :func:`write_manifest`."""
    table = pq.read_table(path)
    info = json.loads((table.schema.metadata or {}).get(_METADATA_KEY, b"{}"))
    if "classes" not in info:
        raise ValueError(f"{path} is not a cellpipe manifest (no class list in its metadata)")
    crop = CropGeometry(**info["crop"]) if info.get("crop") else None
    return Manifest(conform(table.to_pandas()), tuple(info["classes"]), crop)


def write_rejections(rejections: Sequence[Rejection], path: Path) -> None:
    """Write the rejected list (path, reason) as CSV, atomically."""
    frame = pd.DataFrame([(r.path, r.reason) for r in rejections], columns=["path", "reason"])
    with atomic_path(path) as tmp:
        frame.sort_values(["path", "reason"]).to_csv(tmp, index=False)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write any report table as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
