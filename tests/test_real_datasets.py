"""Ingest on the real shared data sets; skipped with a reason where ../shared is absent."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from cellpipe.stages.ingest import IngestParams, ingest
from conftest import SHARED_DATASETS


def _extract(name: str, into: Path) -> Path:
    archive = SHARED_DATASETS / f"{name}.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not present (../shared/datasets is only beside a dev checkout)")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / name


def test_melanoma_layout_keeps_the_published_split(tmp_path: Path) -> None:
    source = _extract("melanoma", tmp_path)
    result = ingest(source, IngestParams(classes=["nevus", "melanoma"]), workers=2)
    splits = result.metrics["splits"]
    assert splits["test"] == {"total": 600, "melanoma": 300, "nevus": 300}
    assert splits["unlabeled"]["total"] == 7018
    assert splits["train"]["total"] + splits["val"]["total"] == 200
    assert result.metrics["rejected"] == 0
