"""Synthetic training images (the augment stage's output) as a shards folder.

It holds one split, ``train``: synthetic images may join training and nothing else.
Each row carries its provenance: ``synthetic`` (True), the generator's sha256, the
sample seed and the sample's index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellpipe.data.shards import SplitShard, SplitWriter, open_split, read_meta
from cellpipe.errors import InputError
from cellpipe.fsutil import atomic_dir, write_json

SYNTHETIC_SPLIT = "train"  # the only split synthetic images may ever join


def write_synthetic(folder: Path, meta: dict, images: np.ndarray, labels: np.ndarray, *,
                    provenance: dict) -> None:
    """A shards folder with one ``train`` split of synthetic images, written atomically."""
    classes = meta["classes"]
    rows = pd.DataFrame({
        "path": [f"synthetic/{provenance.get('generator_sha256', '')[:12]}/{i}"
                 for i in range(len(labels))],
        "label": [classes[k] for k in labels],
        "split": SYNTHETIC_SPLIT,
        "synthetic": True,
        "generator_sha256": provenance.get("generator_sha256", ""),
        "sample_seed": provenance.get("sample_seed", -1),
        "sample_index": np.arange(len(labels)),
    })
    with atomic_dir(folder) as tmp:
        writer = SplitWriter(tmp / SYNTHETIC_SPLIT, len(labels), meta["image_size"])
        for position, image in enumerate(images):
            writer.put(position, image)
        writer.finish(rows, labels)
        write_json(tmp / "meta.json", {**meta, "counts": {SYNTHETIC_SPLIT: int(len(labels))},
                                       "synthetic": provenance})


def read_synthetic_meta(folder: Path) -> dict:
    """The synthetic folder's description; InputError naming the augment stage if absent."""
    if not (folder / "meta.json").is_file():
        raise InputError(f"no synthetic images at {folder} (run the augment stage first, "
                         "or leave out --synthetic)")
    return read_meta(folder)


def open_synthetic(folder: Path, meta: dict) -> SplitShard:
    """The synthetic train images, after checking they fit these shards and nothing else.

    Raises InputError if the folder holds any split besides ``train`` (synthetic images
    must never reach validation or test) or was made for other classes or sizes.
    """
    synthetic_meta = read_synthetic_meta(folder)
    splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if splits != [SYNTHETIC_SPLIT]:
        raise InputError(f"{folder} holds splits {splits}: synthetic images may only join "
                         f"'{SYNTHETIC_SPLIT}', never validation or test")
    for key in ("classes", "image_size"):
        if synthetic_meta[key] != meta[key]:
            raise InputError(f"{folder} was made for {key} {synthetic_meta[key]}, the shards "
                             f"have {meta[key]}: rerun the augment stage")
    return open_split(folder, SYNTHETIC_SPLIT)
