"""Slide readers, cell finding, tiles, and the batch run's resume/quarantine guarantees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellpipe.data.geometry import Box
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import CellFinderParams, find_cells
from cellpipe.slides.readers import OpenSlideSlide, SlideUnreadable, TiffSlide, open_slide
from cellpipe.slides.scoring import ScoreParams, resolve_cells, score_slide
from cellpipe.slides.tiles import TileParams, tissue_tiles
from slide_fixtures import ColourRuleClassifier, smear, smear_inbox, write_smear

MODEL = ModelKey("colour_rules", "1")
PARAMS = ScoreParams(cells=CellFinderParams(cell_diameter=40))


def _gradient(height: int, width: int) -> np.ndarray:
    """A smooth RGB image: JPEG-compressed copies stay close to it."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)],
                    axis=-1).astype(np.uint8)


# --- readers ---------------------------------------------------------------------------


def test_16_bit_tiff_is_scaled_per_slide_not_per_region(tmp_path: Path) -> None:
    values = np.tile(np.linspace(100, 4000, 256, dtype=np.uint16), (64, 1))  # 12-bit camera
    tifffile.imwrite(tmp_path / "deep.tif", values)
    with open_slide(tmp_path / "deep.tif") as reader:
        assert isinstance(reader, TiffSlide)
        whole = reader.read_region(Box(0, 0, 256, 64))
        right = reader.read_region(Box(128, 0, 256, 64))
    assert whole.dtype == np.uint8 and whole.shape == (64, 256, 3)
    assert whole[:, 0].max() <= 2 and whole[:, -1].min() >= 253  # the full range is used
    np.testing.assert_array_equal(right, whole[:, 128:])  # one scaling for the whole slide


def test_multi_page_tiff_reads_each_page(tmp_path: Path) -> None:
    pages = [np.full((40, 60, 3), value, np.uint8) for value in (10, 120, 240)]
    with tifffile.TiffWriter(tmp_path / "fields.tif") as writer:
        for page in pages:
            writer.write(page, photometric="rgb")
    with open_slide(tmp_path / "fields.tif") as reader:
        assert reader.pages == 3 and reader.dimensions == (60, 40)
        for index, page in enumerate(pages):
            np.testing.assert_array_equal(reader.read_region(Box(5, 5, 25, 15), page=index),
                                          page[5:15, 5:25])


def test_tiled_pyramidal_tiff_reads_regions_at_every_level(tmp_path: Path) -> None:
    image = _gradient(1000, 1500)
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as writer:
        writer.write(image, tile=(256, 256), subifds=2, photometric="rgb", compression="zlib")
        for factor in (2, 4):
            writer.write(image[::factor, ::factor], tile=(256, 256), subfiletype=1,
                         photometric="rgb", compression="zlib")
    with open_slide(tmp_path / "pyramid.tif") as reader:
        assert reader.level_dimensions == [(1500, 1000), (750, 500), (375, 250)]
        np.testing.assert_array_equal(reader.read_region(Box(700, 300, 1000, 560)),
                                      image[300:560, 700:1000])
        np.testing.assert_array_equal(reader.read_region(Box(10, 20, 90, 60), level=2),
                                      image[::4, ::4][20:60, 10:90])
        overview, scale = reader.overview(300)
        assert overview.shape == (200, 300, 3) and scale == pytest.approx(0.2)


def test_openslide_reads_a_tiled_tiff(tmp_path: Path) -> None:
    image = _gradient(600, 800)
    tifffile.imwrite(tmp_path / "wsi.tif", image, tile=(256, 256), photometric="rgb",
                     compression="jpeg")
    with OpenSlideSlide(tmp_path / "wsi.tif") as reader:
        assert reader.dimensions == (800, 600)
        region = reader.read_region(Box(100, 200, 400, 300)).astype(int)
    assert np.abs(region - image[200:300, 100:400]).mean() < 3  # JPEG-close


def test_unreadable_and_unsupported_slides_raise_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    (tmp_path / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideUnreadable, match="not a readable TIFF"):
        open_slide(tmp_path / "broken.tif")
    with pytest.raises(SlideUnreadable, match="unsupported slide format '.txt'"):
        open_slide(tmp_path / "notes.txt")


# --- cutting slides into inputs ----------------------------------------------------------


def test_cell_finding_finds_at_least_95_percent_of_known_cells() -> None:
    truth, found_boxes = 0, 0
    hits = 0
    for seed in range(6):
        image, cells = smear((400, 300), seed=seed, red=18, white=2)
        found = find_cells(image, CellFinderParams(cell_diameter=40))
        found_boxes += len(found)
        truth += len(cells)
        hits += sum(any(f.box.x0 <= x < f.box.x1 and f.box.y0 <= y < f.box.y1 for f in found)
                    for _, x, y in cells)
        stained = [f for f in found if f.source == "stained"]
        assert len(stained) == sum(kind == "WBC" for kind, _, _ in cells)
    assert hits / truth >= 0.95
    assert found_boxes <= 1.15 * truth  # no shower of fragments


def test_blank_field_has_no_cells() -> None:
    blank = np.full((200, 300, 3), 210, np.uint8)
    assert find_cells(blank, CellFinderParams(cell_diameter=40)) == []


def test_resolve_cells_uses_the_stain_and_merges_lobes() -> None:
    names = ("RBC", "WBC", "Platelets")
    boxes = [Box(0, 0, 100, 100), Box(20, 20, 90, 90), Box(200, 0, 260, 60), Box(90, 0, 150, 60)]
    stained = np.array([True, True, False, False])
    probabilities = np.array([[0.1, 0.8, 0.1],   # a white cell
                              [0.1, 0.8, 0.1],   # another lobe of it
                              [0.2, 0.7, 0.1],   # unstained: cannot be a white cell
                              [0.7, 0.2, 0.1]])  # a red cell touching it
    labels, keep = resolve_cells(boxes, stained, probabilities, names, ScoreParams())
    assert keep.tolist() == [True, False, True, True]
    assert [names[i] for i in labels[keep]] == ["WBC", "RBC", "RBC"]


def test_tiles_skip_blank_background(tmp_path: Path) -> None:
    image = np.full((512, 1024, 3), 240, np.uint8)
    image[:, :416] = (190, 90, 150)  # stained tissue on the left
    Image.fromarray(image).save(tmp_path / "tissue.png")
    with open_slide(tmp_path / "tissue.png") as reader:
        tiles = tissue_tiles(reader, TileParams(size=128, min_tissue=0.5))
    assert tiles and all(tile.x1 <= 384 for tile in tiles)
    assert len(tiles) == 3 * 4  # 3¼ columns of tissue, 4 rows: the ¼-full column is dropped


def test_score_slide_counts_cells_and_draws_an_overlay(tmp_path: Path) -> None:
    image, cells = smear((480, 360), seed=3, red=20, white=3)
    Image.fromarray(image).save(tmp_path / "smear.png")
    with open_slide(tmp_path / "smear.png") as reader:
        result = score_slide(reader, ColourRuleClassifier(), PARAMS)
    assert result.counts["WBC"] == 3
    assert abs(result.counts["RBC"] - 20) <= 2
    assert set(result.timings) >= {"read", "find", "infer"}
    assert result.overlays["overlay"].size == (480, 360)
    assert {"object_id", "x0", "y1", "centroid_x", "class", "p_WBC", "model_version"} <= \
        set(result.objects.columns)


def test_without_overlays_a_result_has_no_pictures_and_the_same_objects(tmp_path: Path) -> None:
    inbox = smear_inbox(tmp_path, 2)
    plain = PARAMS.model_copy(update={"overlay": False})
    score_inbox(str(inbox), tmp_path / "with", ColourRuleClassifier(), PARAMS, MODEL)
    score_inbox(str(inbox), tmp_path / "without", ColourRuleClassifier(), plain, MODEL)
    for folder in (tmp_path / "without" / "slides").iterdir():
        assert not list(folder.glob("overlay*")), folder
        pd.testing.assert_frame_equal(
            pd.read_parquet(folder / "objects.parquet"),
            pd.read_parquet(tmp_path / "with" / "slides" / folder.name / "objects.parquet"))
    assert (tmp_path / "without" / "report.html").is_file()


@pytest.mark.parametrize(("overlay_format", "suffix"), [("jpeg", ".jpg"), ("png", ".png")])
def test_overlays_are_written_in_the_chosen_format_and_linked_by_the_report(
        tmp_path: Path, overlay_format: str, suffix: str) -> None:
    inbox = smear_inbox(tmp_path, 1)
    params = PARAMS.model_copy(update={"overlay_format": overlay_format})
    score_inbox(str(inbox), tmp_path / "out", ColourRuleClassifier(), params, MODEL)
    [folder] = (tmp_path / "out" / "slides").iterdir()
    [picture] = [p for p in folder.glob("overlay*") if not p.name.endswith(".thumb.jpg")]
    assert picture.name == f"overlay{suffix}"
    with Image.open(picture) as image:  # the file is what its name says
        assert image.format == overlay_format.upper() and image.size == (320, 240)
    assert (folder / "overlay.thumb.jpg").is_file()
    assert f"{folder.name}/overlay{suffix}" in (tmp_path / "out" / "report.html").read_text()


def test_windows_count_each_cell_once(tmp_path: Path) -> None:
    image, _ = smear((600, 400), seed=5, red=30, white=2)
    Image.fromarray(image).save(tmp_path / "smear.png")
    with open_slide(tmp_path / "smear.png") as reader:
        whole = score_slide(reader, ColourRuleClassifier(), PARAMS)
        windowed = score_slide(reader, ColourRuleClassifier(),
                               PARAMS.model_copy(update={"window": 256}))
    assert abs(sum(windowed.counts.values()) - sum(whole.counts.values())) <= 2
    assert windowed.counts["WBC"] == whole.counts["WBC"] == 2


# --- the batch ---------------------------------------------------------------------------



def _result_folders(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "slides").iterdir())


def _finished(out: Path) -> list[str]:
    """Result folders in place (a hidden one is still being written)."""
    return [name for name in _result_folders(out) if not name.startswith(".")]


def test_corrupt_slide_is_quarantined_while_the_others_are_scored(tmp_path: Path) -> None:
    inbox = smear_inbox(tmp_path, 3)
    (inbox / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (inbox / "notes.txt").write_text("a stray file")
    out = tmp_path / "results"
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"] == {"scored": 3, "skipped": 0, "quarantined": 2, "ignored": 0}
    reasons = {s["slide"]: s["reason"] for s in report["slides"] if s["status"] == "quarantined"}
    assert reasons["corrupt.jpg"].startswith("cannot open image")
    assert "unsupported slide format" in reasons["notes.txt"]
    assert sorted(p.name for p in (out / "quarantine").iterdir()) == ["corrupt.jpg.json",
                                                                      "notes.txt.json"]
    table = pd.read_csv(out / "summary.csv")
    assert sorted(table["slide"]) == ["slide_00.png", "slide_01.png", "slide_02.png"]
    folder = out / table["result"].iloc[0]
    objects = pd.read_parquet(folder / "objects.parquet")
    summary = json.loads((folder / "summary.json").read_text())
    assert len(objects) == summary["objects"] == sum(summary["counts"].values())
    assert (folder / "overlay.jpg").is_file()

    # Fixed and rerun: it leaves the quarantine; the scored ones are skipped.
    write_smear(inbox / "corrupt.jpg", seed=9)
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"] == {"scored": 1, "skipped": 3, "quarantined": 1, "ignored": 0}
    assert [p.name for p in (out / "quarantine").iterdir()] == ["notes.txt.json"]


def test_a_new_model_version_rescores_and_the_old_results_stay(tmp_path: Path) -> None:
    inbox, out = smear_inbox(tmp_path, 2), tmp_path / "results"
    score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS,
                         ModelKey("colour_rules", "2"))
    assert report["totals"]["scored"] == 2
    assert len(_result_folders(out)) == 4


_KILLABLE_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier
score_inbox({inbox!r}, Path({out!r}), ColourRuleClassifier(delay_s=0.3),
            ScoreParams(cells=CellFinderParams(cell_diameter=40)), ModelKey("colour_rules", "1"))
"""


def test_a_batch_killed_mid_way_and_rerun_yields_one_result_per_slide(tmp_path: Path) -> None:
    inbox, out = smear_inbox(tmp_path, 8), tmp_path / "results"
    script = _KILLABLE_RUN.format(tests=str(Path(__file__).parent), inbox=str(inbox),
                                  out=str(out))
    run = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if (out / "slides").is_dir() and len(_finished(out)) >= 3:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    finished = _finished(out)
    assert 3 <= len(finished) < 8

    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"]["skipped"] == len(finished)
    assert report["totals"]["scored"] == 8 - len(finished)
    folders = _result_folders(out)
    assert len(folders) == 8 and not any(name.startswith(".") for name in folders)
    table = pd.read_csv(out / "summary.csv")
    assert sorted(table["slide"]) == [f"slide_{i:02d}.png" for i in range(8)]
