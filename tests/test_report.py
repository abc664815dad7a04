"""What people look at: report.html beside report.json, and objects.geojson for QuPath.

Slides are generated smears scored by the colour-rule classifier (no Triton); the page is
read back with the standard library's HTML parser, the GeoJSON with the geojson package.
"""

from __future__ import annotations

import json
import logging
from html.parser import HTMLParser
from pathlib import Path

import geojson
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellpipe.slides import report as report_module
from cellpipe.slides.batch import ModelKey, score_inbox, write_run_report
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.reference import count_errors
from cellpipe.slides.report import REPORT_PAGE, page_context, render_report_page
from cellpipe.slides.scoring import PALETTE, ScoreParams
from cellpipe.slides.tiles import TileParams
from slide_fixtures import ColourRuleClassifier, smear_inbox, write_smear

MODEL = ModelKey("colour_rules", "1")
PARAMS = ScoreParams(cells=CellFinderParams(cell_diameter=40))
CARD = {"backbone": "efficientnet_lite0", "precision": "fp32",
        "contract": {"class_names": ["RBC", "WBC", "Platelets"], "image_size": 64,
                     "resize": "pad"},
        "val": {"images": 1137, "accuracy": 0.9974, "macro_f1": 0.9937},
        "onnx_sha256": "3d13c3a7f990eaab30168f3f45ac3bd1e3972f71"}


class Page(HTMLParser):
    """The elements of a page, each as (tag, attributes, the ids of the tables it is in),
    every body row of every table as its cells' text, by table id, and all text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None], tuple[str, ...]]] = []
        self.rows: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self._tables: list[str] = []
        self._in_tbody = False
        self._cell: list[str] | None = None  # the row whose last cell is being read
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.elements.append((tag, attributes, tuple(self._tables)))
        if tag == "table":
            self._tables.append(attributes.get("id") or "")
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self.rows.setdefault(self._tables[-1], []).append([])
        elif tag == "td" and self._in_tbody:
            self._cell = self.rows[self._tables[-1]][-1]
            self._cell.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._tables.pop()
        elif tag == "tbody":
            self._in_tbody = False
        elif tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None and data.strip():
            self._cell[-1] = " ".join(filter(None, (self._cell[-1], data.strip())))

    def all_text(self) -> str:
        return " ".join(self.text)

    def find(self, tag: str, **attributes: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs, _ in self.elements if name == tag
                and all(attrs.get(key) == value for key, value in attributes.items())]

    def links_in(self, table: str) -> list[str]:
        return [str(attrs["href"]) for name, attrs, tables in self.elements
                if name == "a" and table in tables]

    def images_in(self, table: str) -> list[str]:
        return [str(attrs["src"]) for name, attrs, tables in self.elements
                if name == "img" and table in tables]


def _scored(tmp_path: Path, slides: int = 3, **extra: bytes) -> tuple[Path, dict]:
    inbox = smear_inbox(tmp_path, slides)
    for name, content in extra.items():
        (inbox / name).write_bytes(content)
    out = tmp_path / "results"
    run = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL, model_card=CARD)
    return out, run


# --- report.html ------------------------------------------------------------------------


def test_a_run_writes_a_self_contained_report_page(tmp_path: Path) -> None:
    out, run = _scored(tmp_path, **{"corrupt.jpg": b"\xff\xd8\xff\xe0 cut", ".DS_Store": b"x"})
    assert run["totals"] == {"scored": 3, "skipped": 0, "quarantined": 1, "ignored": 1}
    page = Page((out / REPORT_PAGE).read_text(encoding="utf-8"))

    # One row per slide (the hidden file is no slide), with its counts and status.
    rows = page.rows["slides"]
    assert len(rows) == 4
    summary = pd.read_csv(out / "summary.csv").set_index("slide")
    by_slide = {row[0]: row for row in rows}
    for slide in ("slide_00.png", "slide_01.png", "slide_02.png"):
        expected = summary.loc[slide, ["objects", "n_RBC", "n_WBC", "n_Platelets"]]
        assert by_slide[slide][1:6] == ["scored", *map(str, expected)]
        assert by_slide[slide][6] == f"{summary.loc[slide, 'frac_RBC'] * 100:.1f}"
    assert by_slide["corrupt.jpg"][1] == "quarantined"
    assert by_slide["corrupt.jpg"][-1].startswith("cannot open image")

    # Each scored slide: a thumbnail written beside its overlay, linking to the overlay.
    thumbnails = page.images_in("slides")
    assert len(thumbnails) == 3
    assert all(src.endswith("overlay.thumb.jpg") and (out / src).is_file() for src in thumbnails)
    with Image.open(out / thumbnails[0]) as thumbnail:
        assert max(thumbnail.size) <= report_module.THUMBNAIL_SIZE
    links = page.links_in("slides")
    assert sum(link.endswith("/overlay.jpg") for link in links) == 3
    assert sum(link.endswith("/objects.geojson") for link in links) == 3
    assert all((out / link).exists() for link in links)

    # The files not scored, with their reasons; the model and its card.
    not_scored = {row[0]: row[1:] for row in page.rows["not-scored"]}
    assert not_scored.keys() == {"corrupt.jpg", ".DS_Store"}
    assert not_scored["corrupt.jpg"][0] == "quarantined"
    assert not_scored["corrupt.jpg"][1].startswith("cannot open image")
    assert not_scored[".DS_Store"][0] == "ignored"
    assert not_scored[".DS_Store"][1].startswith("hidden file")
    text = page.all_text()
    assert "colour_rules" in text and "efficientnet_lite0" in text and "0.9937" in text

    # Offline: nothing is loaded from anywhere but the page and the results folder.
    assert not page.find("link", rel="stylesheet")
    assert all(attrs.get("src") is None for attrs in page.find("script"))
    references = [attrs.get(key) for _, attrs, _ in page.elements for key in ("src", "href")]
    assert not [ref for ref in references if ref and "://" in ref]


def test_report_page_shows_the_reference_comparison_and_a_stopped_run(tmp_path: Path) -> None:
    out, run = _scored(tmp_path, slides=2)
    comparison = pd.DataFrame([{"slide": "slide_00.png", "RBC_found": 20, "RBC_annotated": 21,
                                "WBC_found": 2, "WBC_annotated": 2},
                               {"slide": "slide_01.png", "RBC_found": 19, "RBC_annotated": 19,
                                "WBC_found": 2, "WBC_annotated": 3}])
    context = page_context(out, {**run, "stopped": "Triton at 127.0.0.1:1: unavailable"},
                           count_errors=count_errors(comparison))
    page = Page(render_report_page(context))
    errors = {row[0]: row[1:] for row in page.rows["reference"]}
    assert errors["RBC"] == ["2", "20.00", "0.50", "-0.50", "50 %"]
    assert errors["WBC"] == ["2", "2.50", "0.50", "-0.50", "50 %"]
    assert page.find("p", **{"class": "stopped", "role": "alert"})
    assert "Triton at 127.0.0.1:1: unavailable" in page.all_text()
    assert "No model card was available" in page.all_text()


def test_slide_names_are_escaped_not_markup(tmp_path: Path) -> None:
    out, _ = _scored(tmp_path, slides=1, **{"<img src=x onerror=alert(1)>.jpg": b"\xff\xd8 no"})
    html = (out / REPORT_PAGE).read_text(encoding="utf-8")
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in html
    assert "<img src=x" not in html


def test_a_report_page_that_fails_keeps_the_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = _scored(tmp_path, slides=1)
    assert (out / REPORT_PAGE).is_file()

    def broken(context: dict) -> str:
        raise RuntimeError("template exploded")

    monkeypatch.setattr(report_module, "render_report_page", broken)
    write_smear(tmp_path / "inbox" / "late.png", seed=7)
    with caplog.at_level(logging.WARNING, logger="cellpipe.slides.report"):
        run = score_inbox(str(tmp_path / "inbox"), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert run["totals"]["scored"] == 1 and run["totals"]["skipped"] == 1
    assert json.loads((out / "report.json").read_text())["finished"] == run["finished"]
    assert not (out / REPORT_PAGE).exists()  # no earlier run's page passing for this one
    assert "could not write the report page" in caplog.text
    assert "template exploded" in caplog.text


def test_tiles_mode_shows_heatmaps(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    tissue = np.clip(np.array((190, 90, 150)) + rng.integers(-20, 20, (96, 128, 3)), 0, 255)
    Image.fromarray(tissue.astype(np.uint8)).save(inbox / "tissue.png")
    params = ScoreParams(mode="tiles", tiles=TileParams(size=32, min_tissue=0.0))
    out = tmp_path / "results"
    run = score_inbox(str(inbox), out, ColourRuleClassifier(), params, MODEL)
    page = Page((out / REPORT_PAGE).read_text(encoding="utf-8"))
    assert page.find("body", **{"class": "tiles"})
    assert "Heatmap" in page.all_text() and "Tiles" in page.all_text()
    assert page.images_in("slides") == [f"{run['slides'][0]['result']}/overlay.thumb.jpg"]
    collection = geojson.loads((out / run["slides"][0]["result"] / "objects.geojson").read_text())
    assert len(collection["features"]) == 12  # 4 × 3 tiles of 32 px


def test_a_stopped_run_report_is_still_written_with_the_page(tmp_path: Path) -> None:
    out = tmp_path / "results"
    write_run_report(out, "inbox/", MODEL, [], "2026-01-01T00:00:00.000000Z",
                     stopped="disk full")
    page = Page((out / REPORT_PAGE).read_text(encoding="utf-8"))
    assert "disk full" in page.all_text() and "2026-01-01 00:00:00 UTC" in page.all_text()
    assert "slides" not in page.rows  # no slide table without slides


# --- objects.geojson --------------------------------------------------------------------


def test_geojson_features_equal_objects_parquet_row_for_row(tmp_path: Path) -> None:
    out, run = _scored(tmp_path, slides=2)
    colours = {"RBC": PALETTE[0], "WBC": PALETTE[1], "Platelets": PALETTE[2]}
    for outcome in run["slides"]:
        folder = out / outcome["result"]
        objects = pd.read_parquet(folder / "objects.parquet")
        with (folder / "objects.geojson").open() as handle:
            collection = geojson.load(handle)
        assert isinstance(collection, geojson.FeatureCollection) and collection.is_valid
        features = collection["features"]
        assert len(features) == len(objects) > 0
        for feature, row in zip(features, objects.to_dict("records"), strict=True):
            geometry = feature["geometry"]
            assert geometry["type"] == "Polygon" and geojson.Polygon(**geometry).is_valid
            ring = geometry["coordinates"][0]
            assert ring[0] == ring[-1] and len(ring) == 5
            xs, ys = [x for x, _ in ring], [y for _, y in ring]
            assert (min(xs), min(ys), max(xs), max(ys)) == \
                (row["x0"], row["y0"], row["x1"], row["y1"])
            properties = feature["properties"]
            assert properties["objectType"] == "detection"
            assert (properties["object_id"], properties["page"]) == (row["object_id"], row["page"])
            assert properties["classification"] == {"name": row["class"],
                                                    "color": list(colours[row["class"]])}
            measurements = properties["measurements"]
            for name in ("RBC", "WBC", "Platelets"):
                assert measurements[f"p_{name}"] == float(row[f"p_{name}"])  # exact, float32
            assert measurements["confidence"] == float(row["confidence"])
