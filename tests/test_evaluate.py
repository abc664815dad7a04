"""The evaluate stage, and `cellpipe evaluate --source`: any labelled folder scored by a model."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from cellpipe.cli import main
from cellpipe.errors import InputError
from cellpipe.stages import evaluate as evaluate_stage
from cellpipe.stages import ingest as ingest_stage
from cellpipe.stages import preprocess as preprocess_stage
from cellpipe.stages import train as train_stage
from conftest import CLASS_COLOURS, REPO, save, unique_image, write_voc_slide

# Two objects of each class on every slide, 20 px squares in the class colour.
OBJECTS = [("a", (5, 5, 25, 25)), ("a", (35, 5, 55, 25)), ("b", (70, 5, 90, 25)),
           ("b", (100, 5, 120, 25)), ("c", (5, 60, 25, 80)), ("c", (35, 60, 55, 80))]


@dataclass(frozen=True)
class Trained:
    source: Path
    work: Path
    model: Path
    calibration: Path
    stage: Path  # the evaluate stage's reports on the pipeline's test split


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The pipeline on 24 VOC slides with settings away from every default (crop geometry,
    resize, resample, padding), so that only the model's contract can reproduce its inputs."""
    work = tmp_path_factory.mktemp("pipeline")
    source = work / "slides"
    for index in range(24):
        write_voc_slide(source, f"s{index:02d}", OBJECTS)
    ingest_stage.run(source, work / "ingest", ingest_stage.IngestParams.model_validate({
        "classes": ["a", "b", "c"], "voc": {"pad_fraction": 0.3, "border": "shift"},
        "split": {"val_fraction": 0.25, "test_fraction": 0.25}}), workers=1)
    preprocess_stage.run(work / "ingest" / "manifest.parquet", source, work / "pre",
                         preprocess_stage.PreprocessParams(image_size=16, resize="crop",
                                                           resample="nearest", pad_value=30),
                         workers=1)
    model = work / "model" / "model.pt"
    train_stage.run(work / "pre" / "shards", work / "ingest" / "manifest.parquet",
                    work / "train", model, train_stage.TrainParams.model_validate({
                        "backbone": "smallcnn", "weights": "none", "batch_size": 16,
                        "phases": [{"trainable": "all", "epochs": 4, "lr": 0.01}]}),
                    device="cpu")
    calibration = model.parent / "calibration.json"
    evaluate_stage.run(model, work / "evaluate", evaluate_stage.EvaluateParams(),
                       shards=work / "pre" / "shards", calibration=calibration, device="cpu")
    return Trained(source, work, model, calibration, work / "evaluate")


def _test_slides(trained: Trained) -> list[str]:
    rows = pd.read_parquet(trained.work / "ingest" / "manifest.parquet")
    return sorted(rows.loc[rows["split"] == "test", "source_id"].unique())


def _copy_slides(trained: Trained, names: list[str], folder: Path) -> Path:
    for sub, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        (folder / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(trained.source / sub / f"{name}{suffix}", folder / sub)
    return folder


def _evaluate_folder(trained: Trained, source: Path, out: Path, **options) -> dict:
    return evaluate_stage.run(trained.model, out, evaluate_stage.EvaluateParams(),
                              source=source, device="cpu", workers=1, **options)


def test_a_folder_is_scored_as_the_stage_scores_its_test_split(trained: Trained,
                                                               tmp_path: Path) -> None:
    # The test slides again, as a lab would hand them over: a folder named valid.
    folder = _copy_slides(trained, _test_slides(trained), tmp_path / "lab" / "valid")
    calibration_before = trained.calibration.read_bytes()
    metrics = _evaluate_folder(trained, folder, tmp_path / "out")

    stage = json.loads((trained.stage / "metrics.json").read_text())
    for key in ("images", "accuracy", "macro_f1", "ece", "ece_calibrated", "temperature"):
        assert metrics[key] == pytest.approx(stage[key], abs=1e-12), key
    assert metrics["temperature_from"] == str(trained.calibration)
    # Same crops, same inputs: the probabilities are the stage's, image for image.
    ours = pd.read_csv(tmp_path / "out" / "predictions.csv")
    theirs = pd.read_csv(trained.stage / "predictions.csv")
    columns = ["path", "label", "predicted", "p_a", "p_b", "p_c"]
    pd.testing.assert_frame_equal(ours[columns], theirs[columns])
    # Nothing refitted, nothing written beside the model; the stage's reports, and
    # what was left out.
    assert trained.calibration.read_bytes() == calibration_before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "confusion_matrix.png", "metrics.json", "mistakes.png", "per_class.csv",
        "predictions.csv", "rejected.csv", "reliability.png"]


def test_classes_the_model_does_not_know_are_listed_and_left_out(
        trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A class-folder set under valid/, with a class of its own (d) and without c.
    colours = {"a": CLASS_COLOURS["a"], "b": CLASS_COLOURS["b"], "d": (240, 240, 240)}
    for label, colour in colours.items():
        for index in range(3):
            save(tmp_path / "lab" / "valid" / label / f"{label}{index}.png",
                 unique_image(100 * index + ord(label), colour, size=(24, 24)))
    with caplog.at_level("WARNING"):
        metrics = _evaluate_folder(trained, tmp_path / "lab", tmp_path / "out")
    assert metrics["images"] == 6 and metrics["unknown_classes"] == {"d": 3}
    assert metrics["absent_classes"] == ["c"]
    assert metrics["per_class"]["c"]["support"] == 0
    rejected = pd.read_csv(tmp_path / "out" / "rejected.csv")
    assert sorted(rejected["path"]) == ["valid/d/d0.png", "valid/d/d1.png", "valid/d/d2.png"]
    assert rejected["reason"].str.contains(
        r"label 'd' is not in the class list \['a', 'b', 'c'\] \(the model's classes\)").all()
    assert "classes the model does not know (it knows a, b, c): d (3)" in caplog.text
    assert "holds no image of class c: every macro average is over the 2 classes" in caplog.text


def test_a_folder_of_unknown_classes_only_is_refused_with_what_it_holds(
        trained: Trained, tmp_path: Path) -> None:
    for index in range(2):
        save(tmp_path / "lab" / "x" / f"{index}.png", unique_image(index, (1, 2, 3)))
    with pytest.raises(InputError, match=r"holds no labelled image of the model's classes "
                                         r"\['a', 'b', 'c'\] \(found: \['x'\]\)"):
        _evaluate_folder(trained, tmp_path / "lab", tmp_path / "out")
    assert len(pd.read_csv(tmp_path / "out" / "rejected.csv")) == 2  # written first


def test_without_a_stored_temperature_the_report_says_uncalibrated(
        trained: Trained, tmp_path: Path) -> None:
    folder = _copy_slides(trained, _test_slides(trained)[:1], tmp_path / "test")
    elsewhere = tmp_path / "bare" / "model.pt"
    elsewhere.parent.mkdir()
    shutil.copy(trained.model, elsewhere)
    metrics = evaluate_stage.run(elsewhere, tmp_path / "out", evaluate_stage.EvaluateParams(),
                                 source=folder, device="cpu", workers=1)
    assert metrics["temperature"] == 1.0 and metrics["temperature_from"].startswith("none")
    assert metrics["ece"] == metrics["ece_calibrated"]
    assert not (elsewhere.parent / "calibration.json").exists()


def test_the_command_takes_shards_or_source(trained: Trained, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    folder = _copy_slides(trained, _test_slides(trained)[:2], tmp_path / "test")
    common = ["evaluate", "--model", str(trained.model), "--out", str(tmp_path / "out"),
              "--params", str(REPO / "params.yaml"), "--device", "cpu", "--workers", "1"]
    assert main([*common, "--source", str(folder)]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["images"] == 12
    both = [*common, "--source", str(folder), "--shards", str(trained.work / "pre" / "shards")]
    assert main(both) == 1
    assert "evaluate takes one of --shards" in caplog.text
