"""Ingest stage: turn a source folder of any supported layout into the manifest.

Phases: discover (walk folders, read annotations) → probe (hash and fully decode
every file, in parallel) → expand (one row per page or annotated object) →
check labels → group duplicates → assign splits → write outputs atomically.
Every input that is not in the manifest is in ``rejected.csv`` with its reason.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field, model_validator

from cellpipe.data.geometry import BorderRule, Box, CropGeometry
from cellpipe.data.imageio import ImageLimits, ImageRejected, PageInfo, probe_image
from cellpipe.data.manifest import (
    Manifest,
    conform,
    empty_rows,
    write_manifest,
    write_rejections,
    write_table,
)
from cellpipe.data.sources import Discovery, Layout, Rejection, SourceItem, discover
from cellpipe.data.splits import assign_splits, drop_cross_split_duplicates, merge_duplicate_groups
from cellpipe.errors import StageFailed
from cellpipe.fsutil import write_json
from cellpipe.parallel import map_ordered
from cellpipe.params import StageParams
from cellpipe.stages.options import add_path, add_workers

log = logging.getLogger(__name__)


class VocParams(StageParams):
    """How annotated objects on a slide become crops."""

    pad_fraction: float = Field(0.15, ge=0, le=2, description="margin, × the box's longer side")
    square: bool = True
    border: BorderRule = Field("fill", description="at the image border: fill (crop stays "
                                                   "centred) | shift (crop moves inside)")
    min_object_size: int = Field(8, ge=1, description="shorter box side below this is rejected")

    @property
    def geometry(self) -> CropGeometry:
        """The crop geometry, as the manifest and the model contract carry it."""
        return CropGeometry(self.pad_fraction, self.square, self.border)


class SplitParams(StageParams):
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class IngestParams(StageParams):
    """The ``ingest:`` section of params.yaml."""

    layout: Layout = "auto"
    classes: list[str] = Field(default_factory=list, description="empty: infer, sorted")
    group_pattern: str | None = Field(
        None, description="regex searched in relative paths; group 1 = slide/source id")
    tiff_pages: Literal["first", "all"] = "first"
    min_image_size: int = Field(16, ge=1)
    max_image_pixels: int = Field(100_000_000, ge=1)
    max_rejected_fraction: float = Field(0.05, ge=0, le=1)
    follow_links_out: bool = Field(False, description="ingest files behind symbolic links "
                                                      "that resolve outside the source folder")
    voc: VocParams = VocParams()
    split: SplitParams = SplitParams()


@dataclass(frozen=True)
class FileProbe:
    """What probing one file found: its content hash and usable pages."""

    sha256: str
    pages: tuple[PageInfo, ...]


@dataclass
class IngestResult:
    manifest: Manifest
    rejections: list[Rejection]
    duplicates: pd.DataFrame
    metrics: dict = field(default_factory=dict)
    hidden: list[Rejection] = field(default_factory=list)  # listed, but not failed inputs
    # Labels found outside the class list, with how many files or objects carry each.
    unknown_labels: dict[str, int] = field(default_factory=dict)


def ingest(source: Path, params: IngestParams, *, workers: int = 1,
           classes_from: str = "ingest.classes") -> IngestResult:
    """Build the manifest of ``source``; raises StageFailed above the rejected fraction.

    ``classes_from`` says in rejection reasons where ``params.classes`` came from.
    """
    found = discover(source, params.layout, classes=params.classes,
                     group_pattern=params.group_pattern, links_out=params.follow_links_out)
    if found.hidden:
        log.info("%d hidden files not ingested (listed in rejected.csv)", len(found.hidden))
    if found.ignored:
        log.warning("ignored folders outside the layout: %s", ", ".join(found.ignored))
    log.info("found %d files (%d rejected before decoding)",
             len(found.items), len(found.rejections))
    rejections = list(found.rejections)
    probes = _probe_all(source, found.items, params, workers, rejections)
    classes = tuple(params.classes) or _infer_classes(found)
    unknown: Counter[str] = Counter()
    rows = _expand(found.items, probes, params.voc, _ClassList(classes, classes_from, unknown),
                   rejections)
    rows["group"] = merge_duplicate_groups(rows) if len(rows) else pd.Series(dtype="string")
    rows["split"] = assign_splits(rows, val_fraction=params.split.val_fraction,
                                  test_fraction=params.split.test_fraction, seed=params.split.seed)
    rows, duplicates, duplicate_rejections = drop_cross_split_duplicates(rows)
    rejections += duplicate_rejections
    # Only annotated slides are cut into crops; their geometry travels to scoring.
    cut = any(item.objects is not None for item in found.items)
    manifest = Manifest(conform(rows.drop(columns="group")), classes,
                        params.voc.geometry if cut else None)
    metrics = _metrics(manifest, rejections, duplicates)
    return IngestResult(manifest, rejections, duplicates, metrics, hidden=found.hidden,
                        unknown_labels=dict(sorted(unknown.items())))


def check_rejected_fraction(result: IngestResult, limit: float) -> None:
    """Fail the stage when more than ``limit`` of the inputs were rejected."""
    fraction = result.metrics["rejected_fraction"]
    if fraction > limit:
        raise StageFailed(
            f"{result.metrics['rejected']} of {result.metrics['inputs']} inputs rejected "
            f"({fraction:.1%}), above ingest.max_rejected_fraction = {limit:.1%}; "
            "see rejected.csv for the reasons"
        )


def write_outputs(result: IngestResult, out: Path) -> None:
    """Write manifest, duplicates report and metrics into ``out`` (rejected.csv: see run)."""
    write_table(result.duplicates, out / "duplicates.csv")
    write_manifest(result.manifest, out / "manifest.parquet")
    write_json(out / "metrics.json", result.metrics)


SECTION = "ingest"
Params = IngestParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cellpipe ingest``'s options, one per parameter of :func:`run`."""
    add_path(parser, "source", "source data folder")
    add_path(parser, "out", "output folder: manifest.parquet, rejected.csv, duplicates.csv, "
                            "metrics.json")
    add_workers(parser)


def run(source: Path, out: Path, params: IngestParams, *, workers: int) -> IngestResult:
    """The stage as DVC runs it: ingest, write, then enforce the rejected limit.

    The rejected list is written before failing so that the user can read why.
    """
    result = ingest(source, params, workers=workers)
    write_rejections([*result.rejections, *result.hidden], out / "rejected.csv")
    log.info("%d rows in the manifest, %d inputs rejected (%.2f%%), %d duplicate files",
             result.metrics["rows"], result.metrics["rejected"],
             100 * result.metrics["rejected_fraction"], result.metrics["duplicate_files"])
    _warn_absent_classes(result.manifest, result.metrics["absent_classes"])
    check_rejected_fraction(result, params.max_rejected_fraction)
    write_outputs(result, out)
    return result


def _warn_absent_classes(manifest: Manifest, absent: dict[str, list[str]]) -> None:
    """Log each class that some split lacks: too few images (or slides) to be in all."""
    rows = manifest.rows
    for name in manifest.classes:
        missing = [split for split, names in absent.items() if name in names]
        if missing:
            own = rows[rows["label"] == name]
            log.warning("class '%s' is missing from split %s: %d images from %d sources "
                        "(slides or groups), too few to be in every split", name,
                        ", ".join(missing), len(own), own["source_id"].nunique())


# --- probe ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ProbeTask:
    path: Path
    limits: ImageLimits
    pages: Literal["first", "all"]


def _probe_one(task: _ProbeTask) -> FileProbe | str:
    """Hash and decode one file; a string return is the rejection reason."""
    try:
        pages = probe_image(task.path, task.limits, pages=task.pages)
        with task.path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except ImageRejected as rejected:
        return str(rejected)
    return FileProbe(digest, tuple(pages))


def _probe_all(source: Path, items: Sequence[SourceItem], params: IngestParams, workers: int,
               rejections: list[Rejection]) -> dict[str, FileProbe]:
    limits = ImageLimits(min_side=params.min_image_size, max_pixels=params.max_image_pixels)
    tasks = [_ProbeTask(source / item.path, limits, params.tiff_pages) for item in items]
    probes: dict[str, FileProbe] = {}
    outcomes = map_ordered(_probe_one, tasks, workers=workers, desc="ingest: decode + hash")
    for item, outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, str):
            rejections.append(Rejection(item.path, outcome))
        else:
            probes[item.path] = outcome
    return probes


# --- expand --------------------------------------------------------------------------------


def _infer_classes(found: Discovery) -> tuple[str, ...]:
    labels = {item.label for item in found.items if item.label is not None}
    labels |= {obj.label for item in found.items for obj in item.objects or ()}
    return tuple(sorted(labels))


@dataclass(frozen=True)
class _ClassList:
    """The labels a manifest may hold, where that list came from (for the reasons), and a
    tally of the labels found outside it."""

    names: Sequence[str]
    origin: str
    unknown: Counter[str]

    def __contains__(self, label: object) -> bool:
        return label in self.names

    def reject(self, label: str) -> str:
        """Count ``label`` as unknown; the rejection reason."""
        self.unknown[label] += 1
        return f"label '{label}' is not in the class list {list(self.names)} ({self.origin})"


def _expand(items: Sequence[SourceItem], probes: dict[str, FileProbe], voc: VocParams,
            known: _ClassList, rejections: list[Rejection]) -> pd.DataFrame:
    """One manifest row per usable page (whole images) or object (annotated slides)."""
    records: list[dict] = []
    for item in items:
        probe = probes.get(item.path)
        if probe is None:
            continue
        base = {"path": item.path, "sha256": probe.sha256, "source_id": item.source_id,
                "split": item.split}
        if item.objects is None:
            if item.label is not None and item.label not in known:
                rejections.append(Rejection(item.path, known.reject(item.label)))
                continue
            for page in probe.pages:
                records.append({**base, "label": item.label, "page": page.index,
                                "width": page.width, "height": page.height})
        else:
            records += _object_rows(item, probe.pages[0], base, voc, known, rejections)
    rows = pd.DataFrame.from_records(records) if records else empty_rows()
    return rows.astype({"split": "object", "label": "object"})


def _object_rows(item: SourceItem, page: PageInfo, base: dict, voc: VocParams,
                 known: _ClassList, rejections: list[Rejection]) -> list[dict]:
    records = []
    for number, obj in enumerate(item.objects or (), start=1):
        where = f"object {number} ({obj.label} at {obj.box})"
        if obj.label not in known:
            reason = f"{where}: {known.reject(obj.label)}"
            rejections.append(Rejection(item.path, reason))
            continue
        x0, y0, x1, y1 = obj.box
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(page.width, x1), min(page.height, y1)
        if x1 <= x0 or y1 <= y0:
            rejections.append(Rejection(item.path, f"{where}: empty box inside the "
                                                   f"{page.width}x{page.height} image"))
            continue
        if min(x1 - x0, y1 - y0) < voc.min_object_size:
            reason = (f"{where}: {x1 - x0}x{y1 - y0} px is below "
                      f"ingest.voc.min_object_size = {voc.min_object_size}")
            rejections.append(Rejection(item.path, reason))
            continue
        crop = voc.geometry.crop(Box(x0, y0, x1, y1), page.width, page.height)
        records.append({**base, "label": obj.label, "page": page.index,
                        "x0": crop.x0, "y0": crop.y0, "x1": crop.x1, "y1": crop.y1,
                        "width": crop.width, "height": crop.height})
    return records


# --- metrics -------------------------------------------------------------------------------


def _metrics(manifest: Manifest, rejections: Sequence[Rejection],
             duplicates: pd.DataFrame) -> dict:
    """Counts per class and split, for ``dvc metrics show``, and the classes each labelled
    split lacks."""
    rows = manifest.rows
    inputs = len(rows) + len(rejections)
    per_split = {}
    for split, part in rows.groupby("split", sort=True):
        counts = part["label"].fillna("(unlabeled)").value_counts()
        per_split[split] = {"total": len(part), **{k: int(v) for k, v in sorted(counts.items())}}
    return {
        "inputs": inputs,
        "rows": len(rows),
        "rejected": len(rejections),
        "rejected_fraction": round(len(rejections) / inputs, 6) if inputs else 0.0,
        "duplicate_files": int(len(duplicates)),
        "classes": {name: int((rows["label"] == name).sum()) for name in manifest.classes},
        "splits": per_split,
        "absent_classes": {split: [name for name in manifest.classes
                                   if name not in per_split[split]]
                           for split in ("train", "val", "test") if split in per_split},
    }
