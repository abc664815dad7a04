"""Preprocess: shards hold the right pixels for the right labels, in manifest order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpipe.data.geometry import Box, cut
from cellpipe.data.shards import open_split, read_meta
from cellpipe.data.transforms import fit_square
from cellpipe.stages import ingest as ingest_stage
from cellpipe.stages import preprocess as preprocess_stage
from cellpipe.stages.preprocess import PreprocessParams
from conftest import CLASS_COLOURS, save, unique_image, write_voc_slide


def _run_both(source: Path, out: Path, ingest_overrides: dict | None = None,
              **preprocess_overrides) -> dict:
    ingest_params = ingest_stage.IngestParams.model_validate(ingest_overrides or {})
    ingest_stage.run(source, out / "ingest", ingest_params, workers=1)
    params = PreprocessParams.model_validate(preprocess_overrides)
    return preprocess_stage.run(out / "ingest" / "manifest.parquet", source, out / "pre", params,
                                workers=1)


def test_shards_hold_each_class_colour_under_its_label(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for label in ("a", "b", "c"):
        for index in range(10):
            save(source / label / f"{index}.png", unique_image(index, CLASS_COLOURS[label]))
    metrics = _run_both(source, tmp_path / "out", image_size=24)
    shards = tmp_path / "out" / "pre" / "shards"
    meta = read_meta(shards)
    assert meta["classes"] == ["a", "b", "c"] and meta["image_size"] == 24
    assert sum(metrics["images"].values()) == 30
    for split in meta["counts"]:
        part = open_split(shards, split)
        assert part.images.shape[1:] == (24, 24, 3) and part.images.dtype == np.uint8
        assert len(part.images) == len(part.labels) == len(part.rows) == meta["counts"][split]
        for image, label in zip(part.images, part.labels, strict=True):
            colour = np.array(CLASS_COLOURS[meta["classes"][label]])
            centre = image[8:16, 8:16].reshape(-1, 3).mean(axis=0)
            assert np.abs(centre - colour).max() < 25
    assert (tmp_path / "out" / "pre" / "preview.png").stat().st_size > 0


def test_voc_crops_are_cut_from_the_slide(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for index in range(4):
        write_voc_slide(source, f"s{index}", [("a", (10, 10, 50, 50)), ("b", (90, 50, 130, 90))])
    _run_both(source, tmp_path / "out", {"classes": ["a", "b"], "voc": {"pad_fraction": 0.0},
                                         "split": {"val_fraction": 0, "test_fraction": 0}},
              image_size=16)
    part = open_split(tmp_path / "out" / "pre" / "shards", "train")
    assert len(part.images) == 8
    for image, label in zip(part.images, part.labels, strict=True):
        expected = np.array(CLASS_COLOURS["ab"[label]])
        assert np.abs(image[4:12, 4:12].reshape(-1, 3).mean(0) - expected).max() < 20


def test_border_crop_stays_centred_and_is_filled_past_the_image(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_voc_slide(source, "s0", [("a", (0, 0, 30, 30)), ("b", (90, 50, 130, 90))])
    # pad 0.5: the corner object's crop is (-15, -15)…(45, 45); a quarter lies outside.
    _run_both(source, tmp_path / "out", {"classes": ["a", "b"],
                                         "voc": {"pad_fraction": 0.5, "border": "fill"},
                                         "split": {"val_fraction": 0, "test_fraction": 0}},
              image_size=16, pad_value=255)
    part = open_split(tmp_path / "out" / "pre" / "shards", "train")
    corner = part.images[list(part.labels).index(0)].astype(int)
    assert (corner[:3, :, :] == 255).all() and (corner[:, :3, :] == 255).all(), "filled outside"
    centre = corner[6:10, 6:10].reshape(-1, 3).mean(0)
    assert np.abs(centre - np.array(CLASS_COLOURS["a"])).max() < 20, "object in the centre"


def test_cut_fills_only_outside_the_image() -> None:
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    inside = cut(image, Box(1, 1, 4, 3))
    assert inside.base is image or np.shares_memory(inside, image), "no copy when inside"
    out = cut(image, Box(-2, 2, 3, 6), fill=7)
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[:2, 2:], image[2:4, 0:3])
    assert (out[:, :2] == 7).all() and (out[2:, :] == 7).all()
    assert (cut(image, Box(10, 10, 12, 12), fill=9) == 9).all(), "wholly outside"


def test_each_file_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src"
    write_voc_slide(source, "s0", [("a", (10, 10, 40, 40)), ("a", (50, 10, 80, 40)),
                                   ("b", (60, 60, 90, 90))])
    ingest_params = ingest_stage.IngestParams(split={"val_fraction": 0, "test_fraction": 0})
    ingest_stage.run(source, tmp_path / "ingest", ingest_params, workers=1)
    calls = []
    real = preprocess_stage.read_rgb
    monkeypatch.setattr(preprocess_stage, "read_rgb",
                        lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    preprocess_stage.run(tmp_path / "ingest" / "manifest.parquet", source, tmp_path / "pre",
                         PreprocessParams(image_size=16), workers=1)
    assert len(calls) == 1


def test_pad_keeps_aspect_and_crop_fills() -> None:
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:, :20] = 255  # left half white
    padded = fit_square(wide, 20, mode="pad", pad_value=77)
    assert padded.shape == (20, 20, 3)
    assert (padded[0] == 77).all() and (padded[-1] == 77).all()  # letterbox top and bottom
    assert padded[10, 2, 0] == 255 and padded[10, 17, 0] == 0
    cropped = fit_square(wide, 20, mode="crop")
    assert cropped.shape == (20, 20, 3) and (cropped[:, :8] == 255).all()
    assert (cropped[:, 12:] == 0).all()


def test_file_broken_after_ingest_is_rejected_not_fatal(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for label in ("a", "b"):
        for index in range(6):
            save(source / label / f"{index}.png", unique_image(index, CLASS_COLOURS[label]))
    ingest_params = ingest_stage.IngestParams(split={"val_fraction": 0, "test_fraction": 0})
    ingest_stage.run(source, tmp_path / "ingest", ingest_params, workers=1)
    (source / "a" / "3.png").write_bytes(b"broken since ingest")
    metrics = preprocess_stage.run(tmp_path / "ingest" / "manifest.parquet", source,
                                   tmp_path / "pre", PreprocessParams(image_size=16), workers=1)
    assert metrics["images"] == {"train": 11} and metrics["rejected"] == 1
    part = open_split(tmp_path / "pre" / "shards", "train")
    assert len(part.images) == len(part.labels) == len(part.rows) == 11
    assert "a/3.png" not in set(part.rows["path"])
    assert "a/3.png" in (tmp_path / "pre" / "rejected.csv").read_text()
    assert json.loads((tmp_path / "pre" / "metrics.json").read_text())["rejected"] == 1


def test_parallel_workers_give_identical_shards(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for label in ("a", "b"):
        for index in range(40):  # above the pool threshold
            save(source / label / f"{index}.jpg", unique_image(index, CLASS_COLOURS[label]))
    ingest_params = ingest_stage.IngestParams()
    ingest_stage.run(source, tmp_path / "ingest", ingest_params, workers=2)
    manifest = tmp_path / "ingest" / "manifest.parquet"
    params = PreprocessParams(image_size=16)
    preprocess_stage.run(manifest, source, tmp_path / "one", params, workers=1)
    preprocess_stage.run(manifest, source, tmp_path / "two", params, workers=2)
    for split in ("train", "val", "test"):
        one, two = open_split(tmp_path / "one" / "shards", split), \
            open_split(tmp_path / "two" / "shards", split)
        np.testing.assert_array_equal(one.images, two.images)
        np.testing.assert_array_equal(one.labels, two.labels)


def _twelve_bit_gray() -> np.ndarray:
    """32×32 uint16 of a 12-bit camera: a 1000 row, a 3000 row, a ramp between, a hot pixel.

    Over 0.5% of the pixels sit at 1000 and at 3000, so the 0.5/99.5 percentiles are
    exactly those two values, and the one hot pixel (60000) lies outside them.
    """
    ramp = np.rint(1000 + 2000 * np.arange(32) / 31)
    image = np.tile(ramp, (32, 1)).astype(np.uint16)
    image[0], image[-1] = 1000, 3000
    image[15, 15] = 60000
    return image


@pytest.mark.parametrize("scaling", ["percentile", "dtype"])
def test_16bit_tiff_and_png_become_the_scaled_shard_pixels(tmp_path: Path, scaling: str) -> None:
    """preprocess.bit_depth_scaling reaches the shards: the same 16-bit gray image as a
    TIFF and as a PNG becomes the same uint8 RGB shard image, scaled from its 0.5–99.5
    percentiles (1000 → 0, 3000 → 255, the hot pixel clipped) or from the dtype's
    range (v · 255 / 65535), and meta.json records the rule."""
    gray = _twelve_bit_gray()
    source = tmp_path / "src"
    (source / "tif").mkdir(parents=True)
    tifffile.imwrite(source / "tif" / "cell.tif", gray)
    save(source / "png" / "cell.png", gray)  # Pillow writes a 16-bit grayscale PNG
    _run_both(source, tmp_path / "out", {"split": {"val_fraction": 0, "test_fraction": 0}},
              image_size=32, bit_depth_scaling=scaling)  # 32 px: no resampling

    values = gray.astype(np.float64)
    if scaling == "percentile":
        expected = np.clip(np.rint((values - 1000) * 255 / 2000), 0, 255)
        assert expected[15, 15] == 255 and expected[0].max() == 0 and expected[-1].min() == 255
    else:
        expected = np.rint(values * 255 / 65535)
        assert expected[15, 15] == 233 and expected[-1].max() == 12
    shards = tmp_path / "out" / "pre" / "shards"
    assert read_meta(shards)["bit_depth_scaling"] == scaling
    part = open_split(shards, "train")
    assert sorted(part.rows["path"]) == ["png/cell.png", "tif/cell.tif"]
    for image in part.images:
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=2))
