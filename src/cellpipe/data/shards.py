"""Preprocessed uint8 image shards: what the training loop reads at memory speed.

Layout of a shards folder::

    meta.json                  classes, image size, resize rule, counts per split
    <split>/images.npy         N×S×S×3 uint8 (open with mmap_mode="r")
    <split>/labels.npy         N int16, index into classes; -1 = unlabeled
    <split>/rows.parquet       the manifest rows in shard order (+ manifest_row)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from cellpipe.errors import InputError

SHARDS_FORMAT = 1


@dataclass(frozen=True)
class SplitShard:
    """One split of a shards folder, memory-mapped."""

    images: np.ndarray
    labels: np.ndarray
    rows: pd.DataFrame


def read_meta(shards: Path) -> dict:
    if not (shards / "meta.json").is_file():
        raise InputError(f"no preprocessed shards at {shards} (run the preprocess stage first)")
    meta = json.loads((shards / "meta.json").read_text())
    if meta.get("format") != SHARDS_FORMAT:
        raise ValueError(f"{shards} has shards format {meta.get('format')}, "
                         f"this cellpipe reads format {SHARDS_FORMAT}: rerun preprocess")
    return meta


def open_split(shards: Path, split: str, *, needed_by: str | None = None) -> SplitShard:
    """Memory-map one split; raises InputError naming the splits that exist (and, with
    ``needed_by``, what asked for the missing one)."""
    folder = shards / split
    if not folder.is_dir():
        existing = sorted(p.name for p in shards.iterdir() if p.is_dir()) if shards.is_dir() else []
        missing = f"no split '{split}' in {shards} (splits: {existing})"
        raise InputError(f"{needed_by} needs an '{split}' split: {missing}" if needed_by
                         else missing)
    return SplitShard(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        labels=np.load(folder / "labels.npy"),
        rows=pd.read_parquet(folder / "rows.parquet"),
    )


def labeled(split: SplitShard) -> SplitShard:
    """The rows of ``split`` that have a label (drops -1 = unlabeled)."""
    keep = split.labels >= 0
    if keep.all():
        return split
    return SplitShard(split.images[keep], split.labels[keep], split.rows[keep])


class SplitWriter:
    """Fills one split's image memmap by position, then compacts away failed slots."""

    def __init__(self, folder: Path, count: int, size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.images = open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                  shape=(count, size, size, 3))
        self.filled = np.zeros(count, dtype=bool)

    def put(self, position: int, image: np.ndarray) -> None:
        self.images[position] = image
        self.filled[position] = True

    def finish(self, rows: pd.DataFrame, labels: np.ndarray) -> int:
        """Write labels and rows for the filled slots; return how many were kept."""
        keep = self.filled
        if not keep.all():
            self._compact(keep)
        self.images.flush()
        np.save(self.folder / "labels.npy", labels[keep].astype(np.int16))
        rows[keep].reset_index(drop=True).to_parquet(self.folder / "rows.parquet", index=False)
        return int(keep.sum())

    def _compact(self, keep: np.ndarray) -> None:
        # Rare path (a file changed or broke between ingest and preprocess): copy the
        # good slots into a fresh memmap so positions stay dense.
        path = self.folder / "images.npy"
        compact_path = self.folder / "images.compact.npy"
        compact = open_memmap(compact_path, mode="w+", dtype=np.uint8,
                              shape=(int(keep.sum()), *self.images.shape[1:]))
        compact[:] = self.images[keep]
        compact.flush()
        del self.images
        compact_path.replace(path)
        self.images = np.load(path, mmap_mode="r+")
