"""Preprocess stage: decode each source file once into square RGB uint8 shards per split.

Phases: plan (group manifest rows by file and page, so a slide with 40 annotated
cells is decoded once) → decode + crop + resize (in parallel) → write shards,
rejected list, metrics and a contact sheet, all atomically.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from cellpipe.data.geometry import Box, cut
from cellpipe.data.imageio import BitDepthScaling, ImageLimits, ImageRejected, read_rgb
from cellpipe.data.manifest import Manifest, read_manifest, write_rejections
from cellpipe.data.preview import contact_sheet
from cellpipe.data.shards import SHARDS_FORMAT, SplitWriter
from cellpipe.data.sources import Rejection
from cellpipe.data.transforms import Resample, ResizeMode, fit_square
from cellpipe.fsutil import atomic_dir, write_json
from cellpipe.parallel import map_ordered
from cellpipe.params import StageParams
from cellpipe.stages.options import add_path, add_workers

log = logging.getLogger(__name__)

_PREVIEW_PER_CLASS = 12


class PreprocessParams(StageParams):
    """The ``preprocess:`` section of params.yaml."""

    image_size: int = Field(64, ge=8, le=2048)
    resize: ResizeMode = "pad"
    pad_value: int = Field(0, ge=0, le=255)
    resample: Resample = "bilinear"
    bit_depth_scaling: BitDepthScaling = "percentile"


@dataclass(frozen=True)
class _DecodeTask:
    """All manifest rows that come from one page of one file."""

    path: Path
    page: int
    row_numbers: tuple[int, ...]
    boxes: tuple[Box | None, ...]
    params: PreprocessParams


def _decode_task(task: _DecodeTask) -> list[np.ndarray] | str:
    """Decode the page once and return one model input per row; a string is the reason."""
    try:
        # Size limits were enforced by ingest; here only decode problems can remain.
        page = read_rgb(task.path, task.page, scaling=task.params.bit_depth_scaling,
                        limits=ImageLimits(min_side=1, max_pixels=2**62))
    except ImageRejected as rejected:
        return str(rejected)
    inputs = []
    for box in task.boxes:
        # A crop reaching past the image border (ingest.voc.border: fill) gets pad_value there.
        region = page if box is None else cut(page, box, fill=task.params.pad_value)
        inputs.append(fit_square(region, task.params.image_size, mode=task.params.resize,
                                 resample=task.params.resample, pad_value=task.params.pad_value))
    return inputs


def plan_tasks(manifest: Manifest, source: Path, params: PreprocessParams) -> list[_DecodeTask]:
    """One task per (file, page), in manifest order of first appearance."""
    rows = manifest.rows
    tasks = []
    for (path, page), part in rows.groupby(["path", "page"], sort=False):
        boxes = tuple(None if pd.isna(r.x0) else Box(int(r.x0), int(r.y0), int(r.x1), int(r.y1))
                      for r in part.itertuples())
        tasks.append(_DecodeTask(source / path, int(page), tuple(part.index), boxes, params))
    return tasks


def preprocess(manifest: Manifest, source: Path, out: Path, params: PreprocessParams, *,
               workers: int = 1) -> tuple[dict, list[Rejection]]:
    """Write the shards folder ``out``; return metrics and rows that failed to decode."""
    rows = manifest.rows.copy()
    rows["manifest_row"] = np.arange(len(rows))
    labels = manifest.label_index().to_numpy()
    position = rows.groupby("split").cumcount().to_numpy()
    rejections: list[Rejection] = []
    with atomic_dir(out) as tmp:
        writers = {split: SplitWriter(tmp / split, int(count), params.image_size)
                   for split, count in rows["split"].value_counts().items()}
        tasks = plan_tasks(manifest, source, params)
        results = map_ordered(_decode_task, tasks, workers=workers, desc="preprocess", unit="file")
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, str):
                rejections += [Rejection(str(rows.at[n, "path"]), result) for n in task.row_numbers]
                continue
            for row_number, image in zip(task.row_numbers, result, strict=True):
                writers[rows.at[row_number, "split"]].put(position[row_number], image)
        counts = {}
        for split, writer in sorted(writers.items()):
            in_split = (rows["split"] == split).to_numpy()
            counts[split] = writer.finish(rows[in_split], labels[in_split])
        write_json(tmp / "meta.json", _meta(manifest, params, counts))
    return {"image_size": params.image_size, "images": counts,
            "rejected": len(rejections)}, rejections


def write_preview(shards: Path, manifest: Manifest, path: Path, *, split: str = "train") -> None:
    """Contact sheet of the first shard images of each class in ``split``."""
    folder = shards / split
    if not folder.is_dir():
        log.warning("no '%s' split to preview", split)
        return
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    samples = {}
    for index, name in enumerate(manifest.classes):
        chosen = np.flatnonzero(labels == index)
        samples[f"{name} ({len(chosen)})"] = images[chosen[:_PREVIEW_PER_CLASS]]
    contact_sheet(samples, path, tile=max(48, min(96, images.shape[1])))


SECTION = "preprocess"
Params = PreprocessParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cellpipe preprocess``'s options, one per parameter of :func:`run`."""
    add_path(parser, "manifest", "manifest.parquet")
    add_path(parser, "source", "the source folder the manifest's paths are relative to")
    add_path(parser, "out", "output folder: shards/, rejected.csv, metrics.json, preview.png")
    add_workers(parser)


def run(manifest: Path, source: Path, out: Path, params: PreprocessParams, *,
        workers: int) -> dict:
    """The stage as DVC runs it: shards, rejected list, metrics and preview under ``out``."""
    listed = read_manifest(manifest)
    metrics, rejections = preprocess(listed, source, out / "shards", params, workers=workers)
    write_rejections(rejections, out / "rejected.csv")
    write_json(out / "metrics.json", metrics)
    write_preview(out / "shards", listed, out / "preview.png")
    log.info("wrote %s images of %d px to %s (%d rejected)",
             sum(metrics["images"].values()), params.image_size, out / "shards", len(rejections))
    return metrics


def _meta(manifest: Manifest, params: PreprocessParams, counts: dict[str, int]) -> dict:
    """The shards' description: the input half of the model I/O contract."""
    return {
        "format": SHARDS_FORMAT,
        "classes": list(manifest.classes),
        "image_size": params.image_size,
        "layout": "NHWC",
        "dtype": "uint8",
        "color": "RGB",
        "resize": params.resize,
        "pad_value": params.pad_value,
        "resample": params.resample,
        "bit_depth_scaling": params.bit_depth_scaling,
        # How ingest cut annotated objects (null: the source gave whole images).
        "crop": asdict(manifest.crop) if manifest.crop else None,
        "counts": counts,
    }
