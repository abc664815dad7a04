"""The run's report page, ``report.html`` beside ``report.json``, for people to read.

One self-contained file that opens offline from the results folder: inline CSS, a few
lines of inline JavaScript that sort the tables, no request to any server. It shows the
run's totals; every slide with its counts, fractions, status and a thumbnail of its
overlay (the heatmap in tiles mode) linking to the full picture; the files that were
quarantined or ignored, with the reason; the model and its card when one is known; and,
when the counts were compared with reference annotations, the count errors.

The page is rendered with Jinja2 from ``templates/report.html.j2`` (package data, HTML
escaped by the template engine) and written atomically. :func:`write_report_page` never
raises: a page that cannot be made is logged, and the run's results stand.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import pandas as pd
from PIL import Image

from cellpipe.fsutil import atomic_path
from cellpipe.slides.scoring import class_colours

log = logging.getLogger(__name__)

REPORT_PAGE = "report.html"
THUMBNAIL_SUFFIX = ".thumb.jpg"
THUMBNAIL_SIZE = 320  # longest side in pixels: sharp at the page's 160 px on a 2× screen
_TEMPLATE = "report.html.j2"
# Statuses of slides that have a result folder.
_WITH_RESULT = ("scored", "skipped")
# Model card fields shown in the page, in order, with their labels.
_CARD_FIELDS = (("backbone", "Backbone"), ("precision", "Precision"),
                ("published_at", "Published"), ("temperature", "Temperature"))


@dataclass(frozen=True)
class OverlayLink:
    """An overlay picture of a slide (one per page) and the image the page shows for it."""

    name: str        # overlay, overlay_p1…
    href: str        # the full picture, relative to report.html
    thumbnail: str   # a small JPEG beside it, or the full picture scaled by the browser


@dataclass(frozen=True)
class SlideRow:
    """One line of the slides table."""

    slide: str
    status: str
    result: str | None = None    # its result folder, relative to the results folder
    folder: str | None = None    # a link to that folder
    objects: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    fractions: dict[str, float] = field(default_factory=dict)
    overlays: tuple[OverlayLink, ...] = ()
    geojson: str | None = None
    mode: str | None = None      # cells or tiles
    reason: str | None = None


# --- files beside the results -------------------------------------------------------------


def thumbnail_path(overlay: Path) -> Path:
    """Where an overlay's thumbnail lives: ``overlay.jpg`` (or .png) → ``overlay.thumb.jpg``."""
    return overlay.with_name(overlay.stem + THUMBNAIL_SUFFIX)


def save_thumbnail(image: Image.Image, path: Path, size: int = THUMBNAIL_SIZE) -> None:
    """A small JPEG of ``image`` (longest side ``size``) for the report page."""
    thumbnail = image.convert("RGB")
    # reducing_gap 1: a box reduction to about the size, then the filter on that: the same
    # look at a small picture's size, 8x faster than resampling the whole overlay.
    thumbnail.thumbnail((size, size), reducing_gap=1.0)
    thumbnail.save(path, "JPEG", quality=85)


# --- what the page shows --------------------------------------------------------------------


def slide_rows(out: Path, report: dict) -> list[SlideRow]:
    """One row per slide of the run (files ignored as hidden are no slides), with the
    counts of its result folder, also for slides an earlier run scored."""
    return [_slide_row(out, outcome) for outcome in report["slides"]
            if outcome["status"] != "ignored"]


def _slide_row(out: Path, outcome: dict) -> SlideRow:
    if outcome["status"] not in _WITH_RESULT or not outcome.get("result"):
        return SlideRow(outcome["slide"], outcome["status"], reason=outcome.get("reason"))
    folder = out / outcome["result"]
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"counts": outcome.get("counts", {}), "fractions": {}}
    counts = summary["counts"]
    geojson = folder / "objects.geojson"
    return SlideRow(
        outcome["slide"], outcome["status"], result=outcome["result"],
        folder=_href(out, folder) + "/",
        objects=summary.get("objects", sum(counts.values())), counts=counts,
        fractions=summary.get("fractions", {}), overlays=tuple(_overlays(out, folder)),
        geojson=_href(out, geojson) if geojson.is_file() else None, mode=summary.get("mode"))


def _overlays(out: Path, folder: Path) -> list[OverlayLink]:
    """The result folder's overlays, the first page first (overlay, overlay_p1…)."""
    pictures = sorted((p for p in folder.glob("overlay*") if p.suffix in (".jpg", ".png")
                       and not p.name.endswith(THUMBNAIL_SUFFIX)),
                      key=lambda p: (p.stem != "overlay", p.stem))
    links = []
    for picture in pictures:
        thumbnail = thumbnail_path(picture)
        links.append(OverlayLink(picture.stem, _href(out, picture),
                                 _href(out, thumbnail if thumbnail.is_file() else picture)))
    return links


def _href(out: Path, path: Path) -> str:
    """A link relative to the results folder, each part percent-encoded."""
    return "/".join(quote(part) for part in path.relative_to(out).parts)


def class_names(rows: list[SlideRow]) -> list[str]:
    """Every class that any slide counted, in the order the model lists them."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.counts))
    return list(names)


def class_totals(rows: list[SlideRow], names: list[str]) -> list[dict[str, Any]]:
    """Per class: objects over every slide with a result, and their share of all objects."""
    totals = {name: sum(row.counts.get(name, 0) for row in rows) for name in names}
    everything = sum(totals.values())
    return [{"name": name, "count": count, "fraction": count / everything if everything else 0.0}
            for name, count in totals.items()]


def card_facts(card: dict | None) -> list[tuple[str, str]]:
    """The model card's facts a reader wants, as (label, text) pairs."""
    if not card:
        return []
    facts = [(label, str(card[key])) for key, label in _CARD_FIELDS if card.get(key) is not None]
    contract = card.get("contract") or {}
    if contract.get("class_names"):
        facts.append(("Classes", ", ".join(contract["class_names"])))
    if contract.get("image_size"):
        facts.append(("Input", f"{contract['image_size']} px, resize: {contract.get('resize')}"))
    for key, value in (card.get("val") or {}).items():
        facts.append((f"Validation {key.replace('_', ' ')}",
                      f"{value:.4f}" if isinstance(value, float) else str(value)))
    if card.get("onnx_sha256"):
        facts.append(("ONNX sha256", str(card["onnx_sha256"])[:16]))
    return facts


def error_rows(count_errors: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The per-class count errors (``reference.count_errors``) as plain rows."""
    if count_errors is None or count_errors.empty:
        return []
    return count_errors.to_dict("records")


def page_context(out: Path, report: dict, *, model_card: dict | None = None,
                 count_errors: pd.DataFrame | None = None) -> dict[str, Any]:
    """Everything the template shows, from the run's report and the results folder."""
    rows = slide_rows(out, report)
    names = class_names(rows)
    colours = {name: "#{:02x}{:02x}{:02x}".format(*rgb)
               for name, rgb in class_colours(tuple(names)).items()}
    with_result = [row for row in rows if row.result]
    return {
        "report": report,
        "rows": rows,
        "classes": names,
        "colours": colours,
        "class_totals": class_totals(with_result, names),
        "objects": sum(row.objects or 0 for row in with_result),
        "not_scored": [o for o in report["slides"] if o["status"] in ("quarantined", "ignored")],
        "tiles": bool(with_result) and all(row.mode == "tiles" for row in with_result),
        "card": card_facts(model_card),
        "card_json": json.dumps(model_card, indent=2) if model_card else None,
        "errors": error_rows(count_errors),
    }


# --- the page ---------------------------------------------------------------------------


def readable_time(stamp: str) -> str:
    """``2026-12-03T12:59:41.876952Z`` → ``2026-12-03 12:59:41 UTC`` (others as they are)."""
    try:
        moment = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    except (TypeError, ValueError):
        return str(stamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("cellpipe.slides", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["time"] = readable_time
    return environment


def render_report_page(context: dict[str, Any]) -> str:
    """The page's HTML from :func:`page_context`."""
    return _environment().get_template(_TEMPLATE).render(**context)


def write_report_page(out: Path, report: dict, *, model_card: dict | None = None,
                      count_errors: pd.DataFrame | None = None) -> Path | None:
    """Write ``out/report.html`` atomically; return its path, or None when it failed.

    Never raises: the page is a view of results already written, so a failure to render
    it is logged and the batch goes on. An earlier run's page is then removed rather than
    left to pass for this run's (report.json has this run).
    """
    target = out / REPORT_PAGE
    try:
        html = render_report_page(page_context(out, report, model_card=model_card,
                                               count_errors=count_errors))
        with atomic_path(target) as tmp:
            tmp.write_text(html, encoding="utf-8")
    except Exception:  # noqa: BLE001 (any failure: the results stand without the page)
        log.warning("could not write the report page %s; the results and report.json "
                    "are complete", target, exc_info=True)
        _remove_quietly(target)
        return None
    return target


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        log.debug("could not remove %s either", path, exc_info=True)
