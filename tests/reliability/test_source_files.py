"""Ingest lists every file it does not use, with a reason, and stays inside its folder."""

from __future__ import annotations

import zlib
from pathlib import Path

import pandas as pd

from cellpipe.stages.ingest import IngestParams, ingest, run
from conftest import CLASS_COLOURS, save, unique_image, write_voc_slide


def _class_folders(root: Path, per_class: int = 6) -> None:
    for label in ("a", "b"):
        for index in range(per_class):
            path = root / label / f"{label}{index}.png"
            save(path, unique_image(zlib.crc32(str(path).encode()), CLASS_COLOURS[label]))


def test_hidden_files_are_listed_in_rejected_csv_without_failing_the_stage(tmp_path: Path) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    _class_folders(source)
    (source / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    save(source / "a" / "..dotdot.png", unique_image(1, CLASS_COLOURS["a"]))
    save(source / "b" / ".ipynb_checkpoints" / "b0.png", unique_image(2, CLASS_COLOURS["b"]))
    result = run(source, out, IngestParams(max_rejected_fraction=0.0), workers=1)
    assert len(result.manifest.rows) == 12
    assert result.metrics["rejected"] == 0  # not failed inputs: the stage passes at 0 %
    listed = pd.read_csv(out / "rejected.csv").set_index("path")["reason"]
    assert set(listed.index) == {"a/.DS_Store", "a/..dotdot.png", "b/.ipynb_checkpoints/b0.png"}
    assert listed.str.contains("hidden file").all()


def test_links_out_of_the_source_folder_are_rejected_unless_allowed(tmp_path: Path) -> None:
    source, elsewhere = tmp_path / "src", tmp_path / "private"
    _class_folders(source)
    save(elsewhere / "secret.png", unique_image(3, CLASS_COLOURS["a"]))
    (source / "a" / "outside.png").symlink_to(elsewhere / "secret.png")
    (source / "a" / "passwd.png").symlink_to("/etc/passwd")
    (source / "a" / "inside.png").symlink_to(source / "a" / "a0.png")
    save(tmp_path / "private_b" / "other.png", unique_image(4, CLASS_COLOURS["b"]))
    (source / "b" / "linked").symlink_to(tmp_path / "private_b", target_is_directory=True)
    result = ingest(source, IngestParams(max_rejected_fraction=1.0))
    reasons = {r.path: r.reason for r in result.rejections}
    for refused in ("a/outside.png", "a/passwd.png", "b/linked"):  # a linked folder too
        assert "outside the source folder" in reasons[refused]
    assert "outside" not in reasons.get("a/inside.png", "")  # inside the folder: followed
    assert not any("secret" in path for path in result.manifest.rows["path"])

    allowed = ingest(source, IngestParams(max_rejected_fraction=1.0, follow_links_out=True))
    assert {"a/outside.png", "b/linked/other.png"} <= set(allowed.manifest.rows["path"])


def test_voc_images_behind_links_out_are_rejected(tmp_path: Path) -> None:
    source = tmp_path / "voc"
    write_voc_slide(source, "slide1", [("a", (10, 10, 40, 40))])
    write_voc_slide(tmp_path / "other", "slide2", [("b", (10, 10, 40, 40))])
    (source / "JPEGImages" / "slide2.jpg").symlink_to(tmp_path / "other" / "JPEGImages"
                                                       / "slide2.jpg")
    result = ingest(source, IngestParams(layout="voc", max_rejected_fraction=1.0))
    reasons = {r.path: r.reason for r in result.rejections}
    assert "outside the source folder" in reasons["JPEGImages/slide2.jpg"]
