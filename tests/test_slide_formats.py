"""Slides go to the reader that reads their content: OpenSlide for whatever it recognises
(whatever the name), tifffile for other TIFFs, Pillow for camera images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellpipe.slides import readers
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.readers import OpenSlideSlide, SlideUnreadable, open_slide, slide_backend
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier, smear

APERIO = ("Aperio Image Library v10.0.50\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
          "|AppMag = 20|MPP = 0.5")


def write_aperio(path: Path, image: np.ndarray) -> None:
    """A one-level Aperio slide (what OpenSlide detects as ``aperio``), under any name."""
    height, width = image.shape[:2]
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="jpeg",
                     metadata=None, description=APERIO.format(w=width, h=height))


def test_a_format_openslide_recognises_is_read_by_it_whatever_its_name(tmp_path: Path) -> None:
    image, _ = smear((640, 480), seed=3)
    write_aperio(tmp_path / "scan.vendor", image)
    assert slide_backend(tmp_path / "scan.vendor") == "openslide"
    with open_slide(tmp_path / "scan.vendor") as reader:
        assert isinstance(reader, OpenSlideSlide) and reader.dimensions == (640, 480)


def test_an_openslide_format_without_a_slide_suffix_is_scored(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image, _ = smear((640, 480), seed=4)
    write_aperio(inbox / "scan.vendor", image)
    report = score_inbox(str(inbox), tmp_path / "out", ColourRuleClassifier(),
                         ScoreParams.model_validate({"workers": 1, "cells": {"cell_diameter": 40}}),
                         ModelKey("colour_rules", "1"))
    assert report["totals"]["scored"] == 1, report["slides"]
    assert report["slides"][0]["counts"]["RBC"] > 0


@pytest.mark.parametrize(("name", "vendor", "backend"), [
    ("slide.dcm", "dicom", "openslide"),          # DICOM WSI (OpenSlide 4)
    ("slide.czi", "zeiss", "openslide"),
    ("slide.anything", "mirax", "openslide"),
    ("field.tif", "generic-tiff", "tiff"),        # a plain tiled TIFF: tifffile reads deeper
    ("field.tif", None, "tiff"),
    ("field.png", None, "pillow"),
    ("scan.svs", None, "openslide"),              # so the refusal says OpenSlide cannot open it
])
def test_the_reader_follows_what_openslide_detects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   name: str, vendor: str | None,
                                                   backend: str) -> None:
    path = tmp_path / name
    if name.endswith(".tif"):
        tifffile.imwrite(path, np.zeros((32, 32, 3), np.uint8))
    else:
        Image.new("RGB", (32, 32)).save(path, format="PNG")
    monkeypatch.setattr(readers, "_openslide_vendor", lambda _: vendor)
    assert slide_backend(path) == backend


def test_what_no_reader_takes_is_refused_with_the_suffix(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a slide")
    Image.new("RGB", (32, 32)).save(tmp_path / "no_suffix", format="PNG")
    with pytest.raises(SlideUnreadable, match="unsupported slide format '.txt'"):
        slide_backend(tmp_path / "notes.txt")
    with pytest.raises(SlideUnreadable, match="unsupported slide format 'no_suffix'"):
        slide_backend(tmp_path / "no_suffix")
