"""Ingest: each source layout, bad inputs listed with reasons, splits grouped by slide."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pandas as pd
import pytest
import tifffile

from cellpipe.data.manifest import read_manifest
from cellpipe.errors import StageFailed
from cellpipe.stages.ingest import IngestParams, SplitParams, ingest, run
from conftest import CLASS_COLOURS, save, unique_image, write_voc_slide


def _params(**overrides) -> IngestParams:
    return IngestParams.model_validate(overrides)


def _class_folders(root: Path, per_class: int = 10, classes=("a", "b")) -> None:
    for label in classes:
        for index in range(per_class):
            path = root / label / f"{label}{index}.png"
            save(path, unique_image(zlib.crc32(str(path).encode()), CLASS_COLOURS[label]))


def _reasons(result) -> dict[str, str]:
    return {r.path: r.reason for r in result.rejections}


# --- layouts -------------------------------------------------------------------------------


def test_class_folders_without_split(tmp_path: Path) -> None:
    _class_folders(tmp_path, per_class=20)
    result = ingest(tmp_path, _params(split={"val_fraction": 0.2, "test_fraction": 0.2}))
    rows = result.manifest.rows
    assert result.manifest.classes == ("a", "b")
    assert len(rows) == 40 and not result.rejections
    assert set(rows["split"]) == {"train", "val", "test"}
    per_split = rows.groupby("split").size()
    assert per_split["test"] == 8 and per_split["val"] == 8  # 20% each, stratified
    assert (rows.groupby(["split", "label"]).size() == 4).loc[["test", "val"]].all()
    assert rows["sha256"].str.len().eq(64).all()
    assert rows[["width", "height"]].drop_duplicates().values.tolist() == [[40, 32]]


def test_class_folders_with_train_test_folders(tmp_path: Path) -> None:
    _class_folders(tmp_path / "TRAIN", per_class=20)
    _class_folders(tmp_path / "TEST", per_class=5)
    (tmp_path / "TEST_SIMPLE" / "a").mkdir(parents=True)  # an unknown top folder is ignored
    result = ingest(tmp_path, _params(split={"val_fraction": 0.25, "test_fraction": 0.2}))
    rows = result.manifest.rows
    test_rows = rows[rows["split"] == "test"]
    assert test_rows["path"].str.startswith("TEST/").all() and len(test_rows) == 10
    assert rows[rows["path"].str.startswith("TRAIN/")]["split"].isin(["train", "val"]).all()
    assert (rows["split"] == "val").sum() == 10  # val carved from TRAIN only


def test_filename_labels_layout(tmp_path: Path) -> None:
    for index in range(12):
        save(tmp_path / "labeled" / f"{index}_{index % 2}.jpg", unique_image(index, (90, 60, 50)))
    for index in range(7):
        save(tmp_path / "unlabeled" / f"u{index}.jpg", unique_image(100 + index, (90, 60, 50)))
    for index in range(4):
        save(tmp_path / "test" / f"t{index}_{index % 2}.jpg", unique_image(200 + index, (9, 6, 5)))
    result = ingest(tmp_path, _params(classes=["nevus", "melanoma"],
                                      split={"val_fraction": 0.25, "test_fraction": 0.0}))
    rows = result.manifest.rows
    sizes = rows.groupby("split").size().to_dict()
    assert sizes == {"test": 4, "train": 9, "unlabeled": 7, "val": 3}
    assert rows.loc[rows["split"] == "unlabeled", "label"].isna().all()
    assert rows.loc[rows["path"] == "labeled/3_1.jpg", "label"].item() == "melanoma"
    assert result.manifest.label_index()[rows["split"] == "unlabeled"].eq(-1).all()


def test_filename_without_label_suffix_is_rejected(tmp_path: Path) -> None:
    save(tmp_path / "labeled" / "0_1.jpg", unique_image(1, (1, 2, 3)))
    save(tmp_path / "labeled" / "nolabel.jpg", unique_image(2, (1, 2, 3)))
    result = ingest(tmp_path, _params(classes=["n", "m"]))
    assert "no label in file name" in _reasons(result)["labeled/nolabel.jpg"]


@pytest.mark.parametrize("border", ["fill", "shift"])
def test_voc_slides_become_one_crop_per_object(tmp_path: Path, border: str) -> None:
    write_voc_slide(tmp_path, "s1", [("a", (10, 10, 40, 40)), ("b", (100, 60, 130, 100))])
    write_voc_slide(tmp_path, "s2", [("a", (150, 100, 165, 118))])  # past the 160x120 border
    voc = {"pad_fraction": 0.25, "border": border}
    result = ingest(tmp_path, _params(classes=["a", "b"], voc=voc,
                                      split={"val_fraction": 0, "test_fraction": 0}))
    rows = result.manifest.rows.set_index(["path", "label"])
    assert len(rows) == 3 and not result.rejections
    first = rows.loc[("JPEGImages/s1.jpg", "a")]
    # 30 px box + 25% of 30 px on each side → a 45 px square around the same centre.
    assert (first["x0"], first["y0"], first["x1"], first["y1"]) == (2, 2, 47, 47)
    crop = rows.loc[("JPEGImages/s2.jpg", "a")]
    # The box is cut to the image (150..160 × 100..118), then grown to a 27 px square.
    if border == "shift":
        assert (crop["x0"], crop["y0"], crop["x1"], crop["y1"]) == (133, 93, 160, 120)
    else:  # centred on (155, 109), reaching past the border; preprocess fills the rest
        assert (crop["x0"], crop["y0"], crop["x1"], crop["y1"]) == (142, 96, 169, 123)
    assert crop["x1"] - crop["x0"] == crop["y1"] - crop["y0"] == 27, "still square"


def test_voc_imagesets_split_is_kept(tmp_path: Path) -> None:
    for index in range(6):
        write_voc_slide(tmp_path, f"s{index}", [("a", (10, 10, 40, 40)), ("b", (60, 60, 90, 90))])
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("s0\ns1\ns2\ns3\n")
    (main / "val.txt").write_text("s4\n")
    (main / "test.txt").write_text("s5\n")
    rows = ingest(tmp_path, _params(classes=["a", "b"])).manifest.rows
    split_of = rows.groupby("source_id")["split"].unique().map(list).to_dict()
    assert split_of == {"s0": ["train"], "s1": ["train"], "s2": ["train"], "s3": ["train"],
                        "s4": ["val"], "s5": ["test"]}


def test_voc_bad_objects_and_files_are_listed(tmp_path: Path) -> None:
    write_voc_slide(tmp_path, "ok", [("a", (10, 10, 40, 40)), ("b", (50, 50, 80, 80))])
    write_voc_slide(tmp_path, "odd", [("a", (20, 20, 20, 20)),      # degenerate box
                                      ("a", (10, 10, 14, 40)),      # 4 px wide
                                      ("ghost", (60, 60, 90, 90)),  # unknown class
                                      ("b", (50, 50, 80, 80))])
    save(tmp_path / "JPEGImages" / "orphan.jpg", unique_image(9, (5, 5, 5), size=(60, 60)))
    (tmp_path / "Annotations" / "broken.xml").write_text("<annotation><object>")
    result = ingest(tmp_path, _params(classes=["a", "b"], max_rejected_fraction=1.0))
    reasons = [r.reason for r in result.rejections]
    assert any("empty box" in r for r in reasons)
    assert any("below ingest.voc.min_object_size" in r for r in reasons)
    assert any("label 'ghost' is not in the class list" in r for r in reasons)
    assert _reasons(result)["JPEGImages/orphan.jpg"] == "no VOC annotation"
    assert "unreadable VOC annotation" in _reasons(result)["Annotations/broken.xml"]
    assert len(result.manifest.rows) == 3


# --- TIFF sources --------------------------------------------------------------------------


def test_tiff_pages_first_or_all(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        with tifffile.TiffWriter(tmp_path / label / "stack.tif") as writer:
            for page in range(3):
                writer.write(unique_image(page, CLASS_COLOURS[label]), photometric="rgb")
        tifffile.imwrite(tmp_path / label / "deep.tif",
                         (unique_image(7, CLASS_COLOURS[label])[..., 0].astype("uint16") * 200))
    split = {"val_fraction": 0, "test_fraction": 0}
    first = ingest(tmp_path, _params(tiff_pages="first", split=split)).manifest.rows
    every = ingest(tmp_path, _params(tiff_pages="all", split=split)).manifest.rows
    assert len(first) == 4 and len(every) == 8
    assert sorted(every.loc[every["path"] == "a/stack.tif", "page"]) == [0, 1, 2]


# --- bad input, labels, duplicates ---------------------------------------------------------


def test_every_bad_input_is_listed_with_its_reason(tmp_path: Path) -> None:
    _class_folders(tmp_path, per_class=10)
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "a" / "text.jpg").write_text("not an image")
    good = (tmp_path / "a" / "a0.png").read_bytes()
    (tmp_path / "a" / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "a" / "notes.txt").write_text("README for the lab")
    (tmp_path / "a" / "link.png").symlink_to(tmp_path / "nowhere.png")
    save(tmp_path / "b" / "tiny.png", unique_image(1, (0, 0, 0), size=(8, 8)))
    from PIL import Image

    Image.new("1", (12000, 12000)).save(tmp_path / "b" / "bomb.png")
    result = ingest(tmp_path, _params(max_image_pixels=50_000_000, max_rejected_fraction=1.0))
    reasons = _reasons(result)
    assert "empty file" in reasons["a/zero.png"]
    assert "not a recognised image" in reasons["a/text.jpg"]
    assert "truncated" in reasons["a/cut.png"]
    assert "unsupported file type '.txt'" in reasons["a/notes.txt"]
    assert "cannot read file" in reasons["a/link.png"]
    assert "smaller than the minimum side" in reasons["b/tiny.png"]
    assert "decompression" in reasons["b/bomb.png"] or "exceeds the limit" in reasons["b/bomb.png"]
    assert len(result.manifest.rows) == 20
    assert result.metrics["rejected"] == 7 and result.metrics["inputs"] == 27


def test_label_outside_class_list_is_rejected(tmp_path: Path) -> None:
    _class_folders(tmp_path, classes=("a", "b", "c"))
    result = ingest(tmp_path, _params(classes=["a", "b"], max_rejected_fraction=1.0))
    assert {r.path.split("/")[0] for r in result.rejections} == {"c"}
    assert all("label 'c' is not in the class list ['a', 'b']" in r.reason
               for r in result.rejections)
    assert set(result.manifest.rows["label"]) == {"a", "b"}


def test_stage_fails_above_rejected_fraction_but_writes_the_list(tmp_path: Path) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    _class_folders(source, per_class=10)
    for index in range(3):
        (source / "a" / f"junk{index}.png").write_bytes(b"\x00garbage")
    with pytest.raises(StageFailed, match=r"3 of 23 inputs rejected \(13.0%\), above"):
        run(source, out, _params(max_rejected_fraction=0.1), workers=1)
    assert len(pd.read_csv(out / "rejected.csv")) == 3
    assert not (out / "manifest.parquet").exists()
    run(source, out, _params(max_rejected_fraction=0.2), workers=1)
    assert len(read_manifest(out / "manifest.parquet").rows) == 20


def test_duplicates_across_given_splits_kept_in_test_only(tmp_path: Path) -> None:
    _class_folders(tmp_path / "train", per_class=10)
    _class_folders(tmp_path / "test", per_class=3)
    shutil.copy(tmp_path / "test" / "a" / "a1.png", tmp_path / "train" / "a" / "copy.png")
    result = ingest(tmp_path, _params(split={"val_fraction": 0, "test_fraction": 0.2}))
    reasons = _reasons(result)
    assert "exact duplicate of test/a/a1.png (kept in split 'test')" in reasons["train/a/copy.png"]
    assert "train/a/copy.png" not in set(result.manifest.rows["path"])
    assert set(result.duplicates["path"]) == {"test/a/a1.png", "train/a/copy.png"}


def test_duplicates_without_given_split_land_in_one_split(tmp_path: Path) -> None:
    _class_folders(tmp_path, per_class=30)
    for copy in range(5):
        shutil.copy(tmp_path / "a" / "a0.png", tmp_path / "a" / f"dup{copy}.png")
    result = ingest(tmp_path, _params())
    rows = result.manifest.rows
    copies = rows[rows["sha256"] == rows.loc[rows["path"] == "a/a0.png", "sha256"].item()]
    assert len(copies) == 6 and copies["split"].nunique() == 1
    assert len(result.duplicates) == 6 and result.duplicates["kept"].all()


def test_identical_images_with_conflicting_labels_are_rejected(tmp_path: Path) -> None:
    _class_folders(tmp_path, per_class=10)
    shutil.copy(tmp_path / "a" / "a0.png", tmp_path / "b" / "same.png")
    result = ingest(tmp_path, _params(max_rejected_fraction=1.0))
    reasons = _reasons(result)
    assert "conflicting labels ['a', 'b']" in reasons["a/a0.png"]
    assert "conflicting labels" in reasons["b/same.png"]


# --- splits grouped by slide ---------------------------------------------------------------


def test_cells_of_one_slide_never_straddle_splits(tmp_path: Path) -> None:
    # 24 slides, 5 cells each, both classes on most slides; the slide id is in the name.
    for slide in range(24):
        for cell in range(5):
            label = "a" if (slide + cell) % 3 else "b"
            save(tmp_path / label / f"slide{slide:02d}_cell_{cell}.png",
                 unique_image(slide * 10 + cell, CLASS_COLOURS[label]))
    params = _params(group_pattern=r"([^/]+)_cell_\d+", split={"val_fraction": 0.2,
                                                            "test_fraction": 0.2, "seed": 3})
    rows = ingest(tmp_path, params).manifest.rows
    assert rows["source_id"].nunique() == 24
    assert rows.groupby("source_id")["split"].nunique().max() == 1
    assert set(rows["split"]) == {"train", "val", "test"}
    again = ingest(tmp_path, params).manifest.rows
    pd.testing.assert_frame_equal(rows, again)  # deterministic for a seed


def test_group_pattern_sees_folders_or_ignores_them(tmp_path: Path) -> None:
    # Each smear image has cells in both class folders; each class folder also holds
    # several augmentations named _<cell>_<n>.png.
    for slide in range(12):
        for label in ("a", "b"):
            for copy in range(3):
                save(tmp_path / label / f"s{slide:02d}_cell_{copy}.png",
                     unique_image(slide * 100 + copy + (50 if label == "b" else 0),
                                  CLASS_COLOURS[label]))
    by_slide = ingest(tmp_path, _params(group_pattern=r"([^/]+)_cell_\d+")).manifest.rows
    assert by_slide["source_id"].nunique() == 12  # folders ignored: one group per slide
    assert by_slide.groupby("source_id")["split"].nunique().max() == 1
    per_folder = ingest(tmp_path, _params(group_pattern=r"([ab]/s\d+)_cell")).manifest.rows
    assert per_folder["source_id"].nunique() == 24  # the class folder is part of the id
    assert per_folder.groupby("source_id")["split"].nunique().max() == 1


def test_voc_crops_of_a_slide_share_a_split_when_drawn(tmp_path: Path) -> None:
    for index in range(20):
        write_voc_slide(tmp_path, f"s{index:02d}", [("a", (10, 10, 40, 40)),
                                                    ("a", (50, 10, 80, 40)),
                                                    ("b", (60, 60, 90, 90))])
    rows = ingest(tmp_path, _params(classes=["a", "b"])).manifest.rows
    assert len(rows) == 60
    assert rows.groupby("source_id")["split"].nunique().max() == 1
    assert set(rows["split"]) == {"train", "val", "test"}


def test_split_fractions_must_leave_a_train_split() -> None:
    with pytest.raises(ValueError, match="must be below 1"):
        SplitParams(val_fraction=0.5, test_fraction=0.5)


# --- every class in every split, where its images or slides allow -------------------------


def _split_counts(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.groupby(["split", "label"]).size().unstack(fill_value=0)


@pytest.mark.parametrize("seed", [42, 7])
def test_a_class_of_three_single_images_is_in_train_val_and_test(tmp_path: Path,
                                                                 seed: int) -> None:
    # The white-cell case: every image is its own group, and one class has 3 images, fewer
    # than the 7 folds of a 15% draw, so a stratified draw alone may leave it out.
    _class_folders(tmp_path, per_class=60, classes=("a", "b"))
    _class_folders(tmp_path, per_class=3, classes=("c",))
    params = _params(split={"seed": seed})
    result = ingest(tmp_path, params)
    counts = _split_counts(result.manifest.rows)
    assert counts.loc[["train", "val", "test"], "c"].tolist() == [1, 1, 1]
    assert (counts.loc[["val", "test"], ["a", "b"]] >= 8).all(axis=None)  # still stratified
    assert result.metrics["absent_classes"] == {"train": [], "val": [], "test": []}
    again = ingest(tmp_path, params).manifest.rows
    pd.testing.assert_frame_equal(result.manifest.rows, again)  # deterministic for a seed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_rare_class_reaches_every_split_when_its_slides_allow(tmp_path: Path,
                                                                seed: int) -> None:
    # 20 slides of class a; three of them also hold two cells of class c.
    for slide in range(20):
        for cell in range(4):
            save(tmp_path / "a" / f"slide{slide:02d}_cell_{cell}.png",
                 unique_image(slide * 10 + cell, CLASS_COLOURS["a"]))
    for slide in (3, 8, 15):
        for cell in (4, 5):
            save(tmp_path / "c" / f"slide{slide:02d}_cell_{cell}.png",
                 unique_image(slide * 10 + cell, CLASS_COLOURS["c"]))
    params = _params(group_pattern=r"([^/]+)_cell_\d+", split={"seed": seed})
    rows = ingest(tmp_path, params).manifest.rows
    assert rows.groupby("source_id")["split"].nunique().max() == 1  # slides stay whole
    assert (_split_counts(rows).loc[["train", "val", "test"], "c"] == 2).all()


def test_a_class_too_small_for_every_split_is_named_with_the_split_it_misses(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    _class_folders(source, per_class=40, classes=("a", "b"))
    _class_folders(source, per_class=2, classes=("c",))
    with caplog.at_level("WARNING"):
        result = run(source, out, _params(), workers=1)
    counts = _split_counts(result.manifest.rows)
    assert counts.loc["train", "c"] == 1  # train has it first: a class it never saw is lost
    [missing] = [split for split in ("val", "test") if counts.get("c", {}).get(split, 0) == 0]
    assert result.metrics["absent_classes"] == {"train": [], "val": [], "test": [],
                                                **{missing: ["c"]}}
    assert (json.loads((out / "metrics.json").read_text())["absent_classes"][missing] == ["c"])
    assert f"class 'c' is missing from split {missing}: 2 images from 2 sources" in caplog.text


def test_a_split_the_source_gives_is_kept_and_its_missing_class_named(tmp_path: Path) -> None:
    _class_folders(tmp_path / "TRAIN", per_class=20, classes=("a", "b", "c"))
    _class_folders(tmp_path / "TEST", per_class=5, classes=("a", "b"))
    result = ingest(tmp_path, _params(split={"val_fraction": 0.2, "test_fraction": 0.2}))
    rows = result.manifest.rows
    assert rows.loc[rows["split"] == "test", "path"].str.startswith("TEST/").all()
    assert result.metrics["absent_classes"] == {"train": [], "val": [], "test": ["c"]}
