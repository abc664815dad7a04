"""DICOM whole-slide images: read by OpenSlide, and a folder of .dcm files of one series
scored as one slide (local and fsspec inboxes), its files hashed and copied together."""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import openslide
import pandas as pd
import pytest
from pydicom.uid import generate_uid

from cellpipe.slides.batch import InboxSlide, ModelKey, list_inbox, local_copy, score_inbox
from cellpipe.slides.dicom import dicom_series, read_dicom_header
from cellpipe.slides.readers import OpenSlideSlide, open_slide, slide_backend
from cellpipe.slides.scoring import ScoreParams
from dicom_wsi import LABEL_TYPE, write_dicom_image, write_dicom_wsi
from slide_fixtures import ColourRuleClassifier, smear

MODEL = ModelKey("colour_rules", "1")
SIZE = (640, 480)


def _params(mode: str = "cells") -> ScoreParams:
    return ScoreParams.model_validate({"workers": 1, "mode": mode,
                                       "cells": {"cell_diameter": 40}})


def _score(inbox: str | Path, out: Path, mode: str = "cells") -> dict:
    return score_inbox(str(inbox), out, ColourRuleClassifier(), _params(mode), MODEL)


@pytest.fixture
def image() -> np.ndarray:
    return smear(SIZE, seed=5)[0]


# --- the generated slide ---------------------------------------------------------------


def test_the_generated_dicom_wsi_is_read_by_openslide_pixel_for_pixel(
        tmp_path: Path, image: np.ndarray) -> None:
    files = write_dicom_wsi(tmp_path / "case", image, levels=2)
    for path in files:  # any file of the series opens the whole slide
        assert openslide.OpenSlide.detect_format(str(path)) == "dicom"
        assert slide_backend(path) == "openslide"
        with open_slide(path) as reader:
            assert isinstance(reader, OpenSlideSlide)
            assert reader.level_dimensions == [SIZE, (SIZE[0] // 2, SIZE[1] // 2)]
            np.testing.assert_array_equal(reader.overview(SIZE[0])[0], image)
            np.testing.assert_array_equal(reader.overview(SIZE[0] // 2)[0], image[::2, ::2])


# --- grouping ----------------------------------------------------------------------------


def test_the_files_of_one_series_are_one_slide_named_after_its_full_resolution_file(
        tmp_path: Path, image: np.ndarray) -> None:
    inbox = tmp_path / "inbox"
    files = write_dicom_wsi(inbox / "case-1", image, levels=2)
    series = str(read_dicom_header(fsspec.filesystem("file"), str(files[0])).series)
    write_dicom_image(inbox / "case-1" / "a-label.dcm", image[:64, :96], series=series,
                      study=generate_uid(), tile=128, image_type=LABEL_TYPE)
    (inbox / "field.png").write_bytes(b"not even a PNG")
    _, slides = list_inbox(str(inbox))
    assert [slide.name for slide in slides] == ["case-1/level-0.dcm", "field.png"]
    assert [Path(path).name for path in slides[0].companions] == ["a-label.dcm", "level-1.dcm"]
    assert slides[1].companions == ()
    assert pickle.loads(pickle.dumps(slides[0])) == slides[0]  # it travels to worker processes


def test_a_dicom_file_is_found_by_its_preamble_whatever_its_name(
        tmp_path: Path, image: np.ndarray) -> None:
    files = write_dicom_wsi(tmp_path / "case", image, levels=2)
    renamed = files[1].rename(files[1].with_name("1.2.826.0.1.3680043.8.498.7"))
    groups = dicom_series(fsspec.filesystem("file"), [str(files[0]), str(renamed)])
    assert groups == {str(files[0]): (str(renamed),)}


def test_two_series_in_one_folder_are_two_slides(tmp_path: Path, image: np.ndarray) -> None:
    inbox = tmp_path / "inbox"
    write_dicom_wsi(inbox / "scans", image, stem="first")
    write_dicom_wsi(inbox / "scans", smear(SIZE, seed=6)[0], stem="second")
    report = _score(inbox, tmp_path / "out")
    assert [(s["slide"], s["status"]) for s in report["slides"]] == [
        ("scans/first-0.dcm", "scored"), ("scans/second-0.dcm", "scored")]


def test_one_series_in_two_folders_is_a_slide_in_each(tmp_path: Path,
                                                       image: np.ndarray) -> None:
    """OpenSlide looks for a slide's other files in the folder of the one it opens only."""
    series = generate_uid()
    write_dicom_wsi(tmp_path / "inbox" / "a", image, series=series)
    write_dicom_wsi(tmp_path / "inbox" / "b", image, series=series)
    _, slides = list_inbox(str(tmp_path / "inbox"))
    assert [(s.name, len(s.companions)) for s in slides] == [("a/level-0.dcm", 1),
                                                             ("b/level-0.dcm", 1)]


# --- scoring -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cells", "tiles"])
def test_a_dicom_wsi_is_scored_as_one_slide(tmp_path: Path, image: np.ndarray,
                                            mode: str) -> None:
    inbox = tmp_path / "inbox"
    write_dicom_wsi(inbox / "case-1", image, levels=2)
    report = _score(inbox, tmp_path / "out", mode)
    assert report["totals"] == {"scored": 1, "skipped": 0, "quarantined": 0, "ignored": 0}
    outcome = report["slides"][0]
    assert outcome["slide"] == "case-1/level-0.dcm"
    summary = json.loads((tmp_path / "out" / outcome["result"] / "summary.json").read_text())
    assert (summary["width"], summary["height"], summary["mode"]) == (*SIZE, mode)
    if mode == "cells":
        assert outcome["counts"]["RBC"] > 0


def test_a_broken_dcm_is_quarantined_and_a_rerun_scores_nothing_twice(
        tmp_path: Path, image: np.ndarray) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    write_dicom_wsi(inbox / "case-1", image, levels=2)
    (inbox / "case-1" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    first = _score(inbox, out)
    assert first["totals"]["scored"] == 1 and first["totals"]["quarantined"] == 1
    broken = next(s for s in first["slides"] if s["status"] == "quarantined")
    assert broken["slide"] == "case-1/broken.dcm"
    assert "OpenSlide cannot open it" in broken["reason"]
    [record] = [json.loads(path.read_text()) for path in (out / "quarantine").glob("*.json")]
    assert (record["slide"], record["reason"]) == ("case-1/broken.dcm", broken["reason"])

    second = _score(inbox, out)
    assert second["totals"]["skipped"] == 1 and second["totals"]["scored"] == 0
    assert len(list((out / "slides").iterdir())) == 1
    assert pd.read_csv(out / "summary.csv")["slide"].tolist() == ["case-1/level-0.dcm"]


def test_a_changed_file_of_the_series_scores_the_slide_again(tmp_path: Path,
                                                            image: np.ndarray) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    files = write_dicom_wsi(inbox / "case-1", image, levels=2)
    first = _score(inbox, out)["slides"][0]
    series = str(read_dicom_header(fsspec.filesystem("file"), str(files[0])).series)
    write_dicom_image(files[1], image[::2, ::2] // 2, series=series, study=generate_uid(),
                      image_type=("DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"))
    second = _score(inbox, out)["slides"][0]
    assert second["status"] == "scored" and second["result"] != first["result"]


# --- an fsspec inbox -----------------------------------------------------------------------


@pytest.fixture
def memory_inbox(tmp_path: Path, image: np.ndarray) -> Iterator[str]:
    """A memory:// inbox holding one two-level DICOM slide in a folder."""
    fs = fsspec.filesystem("memory")
    root = f"/dicom-{uuid.uuid4().hex}"
    for path in write_dicom_wsi(tmp_path / "made", image, levels=2):
        fs.pipe(f"{root}/case-1/{path.name}", path.read_bytes())
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_a_remote_slide_is_copied_with_all_its_files(memory_inbox: str) -> None:
    fs, slides = list_inbox(memory_inbox)
    assert len(slides) == 1
    with local_copy(fs, slides[0]) as path:
        assert sorted(p.name for p in path.parent.iterdir()) == ["level-0.dcm", "level-1.dcm"]
        with open_slide(path) as reader:
            assert len(reader.level_dimensions) == 2


def test_a_dicom_wsi_in_a_memory_inbox_is_scored_as_one_slide(memory_inbox: str,
                                                             tmp_path: Path) -> None:
    report = _score(memory_inbox, tmp_path / "out")
    assert report["totals"]["scored"] == 1, report["slides"]
    assert report["slides"][0]["slide"] == "case-1/level-0.dcm"
    assert _score(memory_inbox, tmp_path / "out")["totals"]["skipped"] == 1


def test_a_slide_of_one_file_hashes_as_before(tmp_path: Path, image: np.ndarray) -> None:
    """A single-level DICOM (or any one-file slide) keeps its file's sha256: existing
    results are still found."""
    from cellpipe.fsutil import file_sha256

    [only] = write_dicom_wsi(tmp_path / "inbox" / "case", image, levels=1)
    report = _score(tmp_path / "inbox", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / report["slides"][0]["result"]
                          / "summary.json").read_text())
    assert summary["sha256"] == file_sha256(only)
    assert InboxSlide(str(only), "case/level-0.dcm").companions == ()


def test_dicom_slides_are_scored_in_worker_processes_as_in_this_one(
        tmp_path: Path, image: np.ndarray) -> None:
    """A slide's companions travel to a worker with it: same results, same content hash."""
    from cellpipe.slides.workers import score_in_workers

    inbox = tmp_path / "inbox"
    write_dicom_wsi(inbox / "case-1", image)
    write_dicom_wsi(inbox / "case-2", smear(SIZE, seed=6)[0])
    sequential = _score(inbox, tmp_path / "one")
    fs, slides = list_inbox(str(inbox))
    outcomes: list = []
    score_in_workers(fs, slides, tmp_path / "two", ColourRuleClassifier(), _params(), MODEL,
                     workers=2, outcomes=outcomes)
    assert [(o.slide, o.status, o.result, o.counts) for o in outcomes] == [
        (s["slide"], s["status"], s["result"], s["counts"]) for s in sequential["slides"]]
