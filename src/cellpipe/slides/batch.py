"""Score every slide of an inbox once per (slide content, model version); keep the rest.

Layout of a results folder::

    slides/<name>-<sha12>-<model>-v<version>/   one per scored slide, renamed into place
        objects.parquet   one row per cell or tile
        objects.geojson   the same objects as QuPath detections (level-0 pixels)
        summary.json      counts, fractions, timings, provenance
        overlay.jpg       boxes (cells) or a heatmap (tiles) over the slide (.png with
                          score.overlay_format: png)
        overlay.thumb.jpg its thumbnail, for report.html
    quarantine/<name>.json                      a slide that could not be scored, and why
    runs/<start time>.json                      what one run scored, skipped, quarantined
    report.json                                 the latest run's report
    report.html                                 the same, as a page for people to read
    summary.csv                                 every scored slide's counts, one row each

A result folder is written under a temporary name and renamed when complete, so a run
killed at any point leaves either a whole result or none, and the next run scores
exactly the slides without one. Any error while one slide is read, decoded, segmented
or written quarantines that slide with its reason while the batch goes on. Only a failing
server or results disk stops the batch (:class:`ScoringStopped`), because that says
nothing about the slides: they stay pending for the next run, and the stopped run still
writes its report. Inbox locations are stored and logged with credentials redacted.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Literal, TypeVar

import fsspec
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from cellpipe.data.imageio import ImageRejected
from cellpipe.errors import CellpipeError
from cellpipe.fsutil import (
    atomic_dir,
    atomic_path,
    is_hidden,
    is_utf8,
    outside,
    write_json,
)
from cellpipe.parallel import default_workers
from cellpipe.redact import redact_text, redact_url
from cellpipe.slides.annotations import GEOJSON_FILE, write_objects_geojson
from cellpipe.slides.dicom import dicom_series, slide_sha256
from cellpipe.slides.readers import SlideUnreadable, open_slide, slide_backend
from cellpipe.slides.report import save_thumbnail, thumbnail_path, write_report_page
from cellpipe.slides.scoring import ImageClassifier, ScoreParams, SlideResult, score_slide

log = logging.getLogger(__name__)

# ignored: a hidden file (.DS_Store, .gitkeep, an rsync temporary), listed with its reason
# but neither quarantined nor counted by --strict: it is no slide that failed.
Status = Literal["scored", "skipped", "quarantined", "ignored"]
T = TypeVar("T")

# The longest slide name kept in a file name: with the hash, content hash, model tag and a
# temporary file's prefix and suffix it stays well under the 255 bytes a disk allows.
_MAX_NAME = 120
# Errors writing a result that come from the slide's own name, not from the disk.
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ})
# zlib level of overlay PNGs: 1 writes a BCCD overlay ~4x faster than Pillow's 6, for a
# file ~20% larger, and stays lossless (bench/writing.py, bench/results/writing.md).
PNG_COMPRESS_LEVEL = 1
# A worker process takes a second or two to start (imports): below this many inbox files
# per worker it costs more than it saves, and the batch stays in this process.
_MIN_SLIDES_PER_WORKER = 4


class ScoringStopped(CellpipeError):
    """The server or the results disk failed: the batch stops and the slide stays pending."""


class ServerFailed(ScoringStopped):
    """The classifier (Triton, or whatever scores crops) failed while a slide was in flight."""


class ResultsDiskFailed(ScoringStopped):
    """A result or quarantine record could not be written to the results folder."""


@dataclass(frozen=True)
class InboxSlide:
    """A file in the inbox: its fsspec path, its name relative to the inbox, and why it is
    refused without being read (a link out of the inbox…) or ignored (a hidden file).

    A slide of several files (a DICOM series: :mod:`cellpipe.slides.dicom`) is the file it
    is opened from, which names it, and ``companions``: the fsspec paths of its other files,
    in the same folder, which travel with it.
    """

    path: str
    name: str
    refused: str | None = None
    ignored: str | None = None
    companions: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlideOutcome:
    slide: str
    status: Status
    result: str | None = None   # result folder, relative to the results root
    reason: str | None = None   # why it was quarantined
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelKey:
    """Which model a result belongs to; part of every result folder's name."""

    name: str
    version: str

    @property
    def tag(self) -> str:
        return f"{self.name}-v{self.version}"


# --- the inbox ---------------------------------------------------------------------------


def list_inbox(inbox: str, *, links_out: bool = False,
               ) -> tuple[fsspec.AbstractFileSystem, list[InboxSlide]]:
    """Every file under ``inbox`` (a folder or an fsspec URL), in a stable order.

    Files of any suffix are listed, so an unsupported one is quarantined with a reason
    rather than silently ignored. Hidden files, and symbolic links that resolve outside
    the inbox (unless ``links_out``), are listed as refused, with the reason. The files of
    one DICOM series in one folder are one slide (:func:`_group_dicom_series`).
    """
    try:
        fs, root = inbox_filesystem(inbox)
        is_folder = fs.isdir(root)
        found = sorted(fs.find(root)) if is_folder else []
    except Exception as error:  # fsspec backends raise their own types (aiohttp, botocore…)
        raise CellpipeError(f"cannot list the inbox {redact_url(inbox)}: "
                            f"{type(error).__name__}: {redact_text(str(error))}") from None
    if not is_folder:
        raise CellpipeError(f"inbox {redact_url(inbox)} is not a folder")
    root = root.rstrip("/")
    local = "file" in _protocols(fs)
    slides = []
    for path in found:
        name = path[len(root):].lstrip("/")
        if _is_companion(name):
            continue
        refused = (_undecodable(name)
                   or (None if links_out or not local else _link_out_of(Path(root), Path(path)))
                   or (None if not local else _not_regular(Path(path))))
        slides.append(InboxSlide(path, name, refused, ignored=_hidden(name)))
    return fs, _group_dicom_series(fs, slides)


def _group_dicom_series(fs: fsspec.AbstractFileSystem,
                        slides: list[InboxSlide]) -> list[InboxSlide]:
    """Each multi-file DICOM slide as its opening file with the others as its companions
    (no longer listed themselves); a refused or ignored file is never grouped."""
    groups = dicom_series(fs, [s.path for s in slides if not (s.refused or s.ignored)])
    grouped = {path for others in groups.values() for path in others}
    return [replace(slide, companions=groups.get(slide.path, ()))
            for slide in slides if slide.path not in grouped]


def _undecodable(name: str) -> str | None:
    """A name that is not UTF-8 (Latin-1 from an old file share) cannot go into a report."""
    if is_utf8(name):
        return None
    return "file name is not valid UTF-8: not scored; rename it to score it"


def _not_regular(path: Path) -> str | None:
    """A FIFO, socket or device would block or never end a read: it is no slide."""
    if path.exists() and not path.is_file():
        return "not a regular file (a folder, FIFO, socket or device): not scored"
    return None


def _hidden(name: str) -> str | None:
    if is_hidden(name):
        return "hidden file (a name part starts with '.'): ignored; rename it to score it"
    return None


def _link_out_of(root: Path, path: Path) -> str | None:
    """Why a file is refused: it is (or lies under) a link that resolves outside the inbox."""
    target = outside(path, root)
    if target is None:
        return None
    return (f"symbolic link to {target}, outside the inbox: not followed "
            f"(score.follow_links_out: true allows it)")


def inbox_filesystem(inbox: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``inbox`` and the inbox's path on it (nothing is listed)."""
    return fsspec.core.url_to_fs(inbox)


def _is_companion(name: str) -> bool:
    """Index and data files of a MIRAX slide (beside its .mrxs) are not slides themselves."""
    return name.lower().endswith((".dat", ".ini"))


@contextmanager
def local_copy(fs: fsspec.AbstractFileSystem, slide: InboxSlide) -> Iterator[Path]:
    """A local path to the slide: itself on a local disk, else a temporary download
    (OpenSlide and tifffile need real files). Its companions lie beside it, where
    :func:`companion_paths` finds them (OpenSlide looks for them in the same folder)."""
    if "file" in _protocols(fs):
        yield Path(slide.path)
        return
    with tempfile.TemporaryDirectory(prefix="cellpipe-slide-") as folder:
        target = Path(folder) / Path(slide.name).name
        fs.get(slide.path, str(target))
        for other in slide.companions:
            fs.get(other, str(Path(folder) / PurePosixPath(other).name))
        yield target


def companion_paths(path: Path, slide: InboxSlide) -> list[Path]:
    """The local paths of ``slide``'s other files, beside its local copy ``path``."""
    return [path.parent / PurePosixPath(other).name for other in slide.companions]


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


# --- one slide -------------------------------------------------------------------------


def result_name(slide: InboxSlide, sha256: str, model: ModelKey) -> str:
    """The result folder's name: readable slide name, content hash, model version."""
    return f"{_safe_name(slide.name.rsplit('.', 1)[0])}-{sha256[:12]}-{model.tag}"


def _existing_result(out: Path, slide: InboxSlide, sha256: str, model: ModelKey) -> str | None:
    """The name of this slide's finished result for ``model``, if there is one: under
    today's name, or under the name results had before sanitised names carried a hash
    (whose summary must name this very slide, since such names could be shared)."""
    name = result_name(slide, sha256, model)
    if (out / "slides" / name).is_dir():
        return name
    legacy = f"{_legacy_safe_name(slide.name.rsplit('.', 1)[0])}-{sha256[:12]}-{model.tag}"
    summary = out / "slides" / legacy / "summary.json"
    if legacy != name and summary.is_file() \
            and json.loads(summary.read_text()).get("slide") == slide.name:
        return legacy
    return None


def _legacy_safe_name(name: str) -> str:
    """How names were made safe before they carried a hash (results of earlier runs)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _safe_name(name: str) -> str:
    """A relative slide path as one file name, unique per inbox path.

    Anything unusual becomes ``_``, and a long name is cut; when either changed the name,
    a hash of the original follows, so ``dup/trunc.jpg`` and ``dup_trunc.jpg`` never share
    a result or a quarantine record. Plain names stay as they are (and so do their
    existing results).
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    if safe.startswith("."):  # a hidden slide's record must not be hidden itself
        safe = "_" + safe[1:]
    if safe == name and len(safe) <= _MAX_NAME:
        return safe
    # surrogateescape: a name that is not UTF-8 still hashes to its own bytes.
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{safe[:_MAX_NAME]}~{digest}"


def score_and_write(fs: fsspec.AbstractFileSystem, slide: InboxSlide, out: Path,
                    classifier: ImageClassifier, params: ScoreParams,
                    model: ModelKey) -> SlideOutcome:
    """Score one slide unless its result exists; quarantine it if anything about it fails.

    :class:`ScoringStopped` (the server or the results disk failed) is raised instead:
    it is not the slide's fault, and the slide must stay pending for the next run.
    """
    if slide.ignored:
        return SlideOutcome(slide.name, "ignored", reason=slide.ignored)
    if slide.refused:
        return _quarantine(out, slide, slide.refused)
    in_flight = _InFlight(classifier, slide.name)  # may ask the server: outside the try
    try:
        return _score_and_write(fs, slide, out, in_flight, params, model)
    except ScoringStopped:
        raise
    except Exception as error:  # noqa: BLE001 (any failure of this slide's own processing)
        if not isinstance(error, SlideUnreadable | ImageRejected):
            # Not one of our own refusals: the traceback shows where (a bug, a library).
            log.warning("%s: could not be scored", slide.name, exc_info=True)
        return _quarantine(out, slide, _reason(error))


def _score_and_write(fs: fsspec.AbstractFileSystem, slide: InboxSlide, out: Path,
                     classifier: ImageClassifier, params: ScoreParams,
                     model: ModelKey) -> SlideOutcome:
    with local_copy(fs, slide) as path:
        if path.exists() and not path.is_file():  # a FIFO would block the hash for ever
            raise SlideUnreadable("not a regular file (a folder, FIFO, socket or device)")
        slide_backend(path)  # an unsupported format is refused before it is hashed
        sha256 = slide_sha256(path, companion_paths(path, slide))
        name = result_name(slide, sha256, model)
        target = out / "slides" / name
        done = _existing_result(out, slide, sha256, model)
        if done is not None:
            _release(out, slide)
            return SlideOutcome(slide.name, "skipped", f"slides/{done}")
        started = time.perf_counter()
        # Deep (16-bit, float) slides are scaled to 8 bits as the model's training images were.
        with open_slide(path, scaling=classifier.contract.bit_depth_scaling) as reader:
            result = score_slide(reader, classifier, params)
            dimensions = reader.dimensions
        summary = _summary(slide, sha256, dimensions, result, params, model, started)
    try:
        write_result(target, result, summary)
    except OSError as error:
        if error.errno in _NAME_ERRNOS:
            raise  # the slide's name, not the disk: quarantine it
        raise ResultsDiskFailed(f"cannot write the result of {slide.name} to {out}: "
                                f"{error}") from error
    _release(out, slide)
    return SlideOutcome(slide.name, "scored", f"slides/{name}", counts=result.counts)


class _InFlight:
    """The classifier, with any failure of it raised as :class:`ServerFailed` naming the
    slide in flight, so that no server error can be mistaken for a bad slide."""

    def __init__(self, classifier: ImageClassifier, slide: str) -> None:
        self._classifier, self._slide = classifier, slide
        # Reading the contract may be a request to the server (the first of a client).
        self.contract = self._server(lambda: classifier.contract)
        self.model_name = classifier.model_name
        self.model_version = classifier.model_version

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        return self._server(lambda: self._classifier.classify_images(images))

    def _server(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as error:
            raise ServerFailed(f"{error} (slide in flight: {self._slide})") from error


def _reason(error: Exception) -> str:
    """A quarantine reason: our own messages as they are, others with their type."""
    if isinstance(error, SlideUnreadable | ImageRejected):
        return str(error)
    return f"{type(error).__name__}: {redact_text(str(error))}"


def write_result(target: Path, result: SlideResult, summary: dict) -> None:
    """Write the slide's folder under a temporary name, then rename it into place:
    objects (Parquet, and GeoJSON for QuPath), overlays and their thumbnails, summary."""
    started = time.perf_counter()
    with atomic_dir(target) as folder:
        result.objects.to_parquet(folder / "objects.parquet", index=False)
        write_objects_geojson(folder / GEOJSON_FILE, result.objects, tuple(result.counts))
        for name, overlay in result.overlays.items():
            picture = save_overlay(overlay, folder / name, result.overlay_format)
            save_thumbnail(overlay, thumbnail_path(picture))
        summary["timings"]["write"] = round(time.perf_counter() - started, 4)
        write_json(folder / "summary.json", summary)


def save_overlay(overlay: Image.Image, stem: Path, overlay_format: str) -> Path:
    """Save an overlay as ``stem.jpg`` or ``stem.png``; return the file written.

    JPEG at quality 90 without chroma subsampling keeps the one-pixel box lines in their
    class colours (subsampling would smear them); PNG at zlib level 1 is lossless and 4x
    faster than Pillow's default level (bench/writing.py measures both).
    """
    if overlay_format == "png":
        path = stem.with_name(f"{stem.name}.png")
        overlay.save(path, compress_level=PNG_COMPRESS_LEVEL)
    else:
        path = stem.with_name(f"{stem.name}.jpg")
        overlay.convert("RGB").save(path, "JPEG", quality=90, subsampling=0)
    return path


def _summary(slide: InboxSlide, sha256: str, dimensions: tuple[int, int], result: SlideResult,
             params: ScoreParams, model: ModelKey, started: float) -> dict:
    total = sum(result.counts.values())
    return {
        "slide": slide.name,
        "sha256": sha256,
        "width": dimensions[0],
        "height": dimensions[1],
        "mode": params.mode,
        "model": {"name": model.name, "version": model.version},
        "objects": total,
        "counts": result.counts,
        "fractions": {name: round(count / total, 6) if total else 0.0
                      for name, count in result.counts.items()},
        "timings": {**{k: round(v, 4) for k, v in result.timings.items()},
                    "total": round(time.perf_counter() - started, 4)},
        "scored_at": utc_now(),
    }


def _quarantine(out: Path, slide: InboxSlide, reason: str) -> SlideOutcome:
    log.warning("quarantined %s: %s", slide.name, reason)
    record = {"slide": slide.name, "path": redact_url(slide.path), "reason": reason,
              "at": utc_now()}
    try:
        write_json(_quarantine_file(out, slide), record)
    except OSError as error:
        raise ResultsDiskFailed(f"cannot record the quarantine of {slide.name} in {out}: "
                                f"{error}") from error
    return SlideOutcome(slide.name, "quarantined", reason=reason)


def _release(out: Path, slide: InboxSlide) -> None:
    """A slide that scores now is no longer in quarantine (nor under an earlier name)."""
    _quarantine_file(out, slide).unlink(missing_ok=True)
    legacy = out / "quarantine" / f"{_legacy_safe_name(slide.name)}.json"
    if legacy.is_file() and json.loads(legacy.read_text()).get("slide") == slide.name:
        legacy.unlink(missing_ok=True)


def _quarantine_file(out: Path, slide: InboxSlide) -> Path:
    return out / "quarantine" / f"{_safe_name(slide.name)}.json"


# --- a whole run -------------------------------------------------------------------------


def score_inbox(inbox: str, out: Path, classifier: ImageClassifier, params: ScoreParams,
                model: ModelKey, *, model_card: dict | None = None) -> dict:
    """Score every pending slide of ``inbox`` into ``out``; return the run report.

    ``model_card`` (the published card of ``model``, when known) is shown in report.html.
    """
    started = utc_now()
    remove_partial_results(out)
    fs, slides = list_inbox(inbox, links_out=params.follow_links_out)
    log.info("%d files in %s; results in %s (model %s)", len(slides), redact_url(inbox), out,
             model.tag)
    outcomes: list[SlideOutcome] = []
    workers = scoring_workers(params, len(slides))
    try:
        if workers > 1:
            # Imported here: the worker module builds on this one.
            from cellpipe.slides.workers import score_in_workers

            log.info("scoring in %d worker processes", workers)
            score_in_workers(fs, slides, out, classifier, params, model, workers=workers,
                             outcomes=outcomes)
        else:
            for slide in tqdm(slides, desc="score slides", unit="slide"):
                outcomes.append(score_and_write(fs, slide, out, classifier, params, model))
    except ScoringStopped as error:
        _report_stopped_run(out, inbox, model, outcomes, started, error, model_card)
        raise
    return write_run_report(out, inbox, model, outcomes, started, model_card=model_card)


def scoring_workers(params: ScoreParams, slides: int) -> int:
    """Processes to score ``slides`` inbox files with: ``score.workers`` (None or 0: every
    core), and 1 (this process) when there are too few files to repay starting workers."""
    workers = params.workers or default_workers()
    if slides < _MIN_SLIDES_PER_WORKER * workers:
        workers = slides // _MIN_SLIDES_PER_WORKER
    return max(1, workers)


def _report_stopped_run(out: Path, inbox: str, model: ModelKey, outcomes: list[SlideOutcome],
                        started: str, error: ScoringStopped,
                        model_card: dict | None = None) -> None:
    """What a stopped run did before it stopped, when the results disk still takes it."""
    try:
        write_run_report(out, inbox, model, outcomes, started, stopped=str(error),
                         model_card=model_card)
    except OSError:
        log.debug("the stopped run's report could not be written either", exc_info=True)


def remove_partial_results(out: Path) -> None:
    """Delete what a killed run left half-written (never a finished result): result
    folders, and the temporary files of quarantine records, run reports and summary.csv."""
    for leftover in (out / "slides").glob(".*.tmp"):
        log.info("removing the partial result %s of an interrupted run", leftover.name)
        shutil.rmtree(leftover, ignore_errors=True)
    for folder in (out, out / "quarantine", out / "runs"):
        for leftover in folder.glob(".*.tmp"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)


def write_run_report(out: Path, inbox: str, model: ModelKey, outcomes: list[SlideOutcome],
                     started: str, *, stopped: str | None = None,
                     model_card: dict | None = None) -> dict:
    """The run's report (runs/, report.json and report.html) and summary.csv over every
    result.

    ``stopped`` says why a run ended before its last slide (server or disk failure);
    ``model_card`` is shown in report.html. The page comes last and cannot fail the run.
    """
    report = {
        "inbox": redact_url(inbox),
        "model": asdict(model),
        "started": started,
        "finished": utc_now(),
        "totals": {status: sum(o.status == status for o in outcomes)
                   for status in ("scored", "skipped", "quarantined", "ignored")},
        "slides": [asdict(outcome) for outcome in outcomes],
    }
    if stopped is not None:
        report["stopped"] = redact_text(stopped)
    write_json(out / "runs" / f"{started.replace(':', '')}.json", report)
    write_json(out / "report.json", report)
    write_summary_table(out)
    write_report_page(out, report, model_card=model_card)
    return report


def write_summary_table(out: Path) -> pd.DataFrame:
    """summary.csv: one row per result folder, so it can never hold a slide twice."""
    rows = []
    for summary_file in sorted((out / "slides").glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        rows.append({"slide": summary["slide"], "sha256": summary["sha256"],
                     "model": f"{summary['model']['name']}-v{summary['model']['version']}",
                     "objects": summary["objects"],
                     **{f"n_{k}": v for k, v in summary["counts"].items()},
                     **{f"frac_{k}": v for k, v in summary["fractions"].items()},
                     "seconds": summary["timings"]["total"],
                     "result": summary_file.parent.relative_to(out).as_posix()})
    table = pd.DataFrame(rows)
    with atomic_path(out / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
