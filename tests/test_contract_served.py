"""One contract from crop to served answer: what training cut and scaled is what scoring sends.

A tiny model is trained on 16-bit TIFF smears whose cells are annotated, with crop settings
that are not ingest's defaults (wider margin, not square, shifted at the border) and
``dtype`` bit-depth scaling. It is exported, published and served by a real local Triton.
Scoring one of those slides through the server must send the model exactly the pixels
preprocess wrote into the shards for the same cells: the geometry and the scaling come
from the served model's contract, not from scoring settings that could disagree.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellpipe.contract import ModelContract
from cellpipe.data.geometry import Box, CropGeometry
from cellpipe.data.shards import open_split
from cellpipe.serving import triton_config
from cellpipe.serving.client import TritonClassifier
from cellpipe.serving.repository import ModelRepository
from cellpipe.serving.server import LocalTriton, free_port
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import CellFinderParams, find_cells
from cellpipe.slides.readers import open_slide
from cellpipe.slides.scoring import ScoreParams
from cellpipe.stages import export as export_stage
from cellpipe.stages import ingest as ingest_stage
from cellpipe.stages import preprocess as preprocess_stage
from cellpipe.stages import train as train_stage
from slide_fixtures import smear

pytestmark = pytest.mark.slow

CROP = CropGeometry(pad_fraction=0.4, square=False, border="shift")
CELLS = CellFinderParams(cell_diameter=40)
SLIDES = 6


def _deep_slide(path: Path, seed: int) -> None:
    """A 16-bit smear using only the lower ~80% of the range, with noise in the low bits:
    ``dtype`` scaling darkens it, ``percentile`` would stretch it, so the two differ."""
    rgb, _ = smear((320, 240), diameter=40, red=7, white=2, seed=seed)
    rng = np.random.default_rng(seed)
    deep = rgb.astype(np.uint32) * 200 + rng.integers(0, 200, rgb.shape)
    tifffile.imwrite(path, deep.astype(np.uint16), photometric="rgb")


def _annotate(path: Path, annotations: Path) -> int:
    """A VOC annotation of every cell the finder sees on the slide, as scoring will see it."""
    with open_slide(path, scaling="dtype") as reader:
        width, height = reader.dimensions
        rgb = reader.read_region(Box(0, 0, width, height))
    cells = find_cells(rgb, CELLS)
    objects = "".join(
        f"<object><name>{'WBC' if cell.source == 'stained' else 'RBC'}</name><bndbox>"
        f"<xmin>{cell.box.x0}</xmin><ymin>{cell.box.y0}</ymin><xmax>{cell.box.x1}</xmax>"
        f"<ymax>{cell.box.y1}</ymax></bndbox></object>" for cell in cells)
    (annotations / f"{path.stem}.xml").write_text(
        f"<annotation><filename>{path.name}</filename><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size>{objects}</annotation>")
    return len(cells)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Ingest → preprocess → train → export of the deep, annotated smears."""
    root = tmp_path_factory.mktemp("contract")
    source = root / "source"
    (source / "JPEGImages").mkdir(parents=True)
    (source / "Annotations").mkdir()
    objects = {}
    for index in range(SLIDES):
        slide = source / "JPEGImages" / f"deep_{index}.tif"
        _deep_slide(slide, seed=index)
        objects[slide.name] = _annotate(slide, source / "Annotations")
    ingest_params = ingest_stage.IngestParams.model_validate({
        "layout": "voc", "classes": ["RBC", "WBC"],
        "voc": {"pad_fraction": CROP.pad_fraction, "square": CROP.square,
                "border": CROP.border},
        "split": {"val_fraction": 0.34, "test_fraction": 0.0}})
    ingest_stage.run(source, root / "ingest", ingest_params, workers=1)
    preprocess_params = preprocess_stage.PreprocessParams(image_size=32,
                                                          bit_depth_scaling="dtype")
    preprocess_stage.run(root / "ingest" / "manifest.parquet", source, root / "preprocess",
                         preprocess_params, workers=1)
    shards = root / "preprocess" / "shards"
    train_params = train_stage.TrainParams.model_validate({
        "backbone": "smallcnn", "weights": "none", "batch_size": 16,
        "phases": [{"trainable": "all", "epochs": 1, "lr": 0.01}]})
    train_stage.run(shards, root / "ingest" / "manifest.parquet", root / "train",
                    root / "model.pt", train_params, device="cpu")
    (root / "calibration.json").write_text(json.dumps({"temperature": 1.0}))
    export_stage.run(root / "model.pt", root / "calibration.json", shards, root / "export",
                     export_stage.ExportParams())
    return {"root": root, "source": source, "shards": shards, "objects": objects}


@pytest.fixture(scope="module")
def served(pipeline: dict) -> Iterator[TritonClassifier]:
    repository = pipeline["root"] / "triton_repo"
    ModelRepository(repository, triton_config.ServingParams()).publish(pipeline["root"] / "export")
    local = LocalTriton(pipeline["root"] / "state")
    info = local.start(repository, http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port())
    client = TritonClassifier(info.grpc_url)
    try:
        yield client
    finally:
        client.close()
        local.stop()


class _Recording:
    """The served classifier, keeping a copy of every batch of model inputs it is sent."""

    def __init__(self, classifier: TritonClassifier) -> None:
        self._classifier = classifier
        self.contract: ModelContract = classifier.contract
        self.model_name = classifier.model_name
        self.model_version = classifier.pin_served_version()
        self.sent: list[np.ndarray] = []

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        self.sent.append(np.array(images))
        return self._classifier.classify_images(images)


def _shard_images(shards: Path) -> set[bytes]:
    return {image.tobytes() for split in ("train", "val")
            for image in np.asarray(open_split(shards, split).images)}


def test_the_served_contract_carries_crop_geometry_and_bit_depth(
        served: TritonClassifier) -> None:
    """config.pbtxt on the server holds the training crop geometry and 8-bit scaling."""
    assert served.contract.crop == CROP
    assert served.contract.bit_depth_scaling == "dtype"


def test_scoring_sends_the_model_the_pixels_preprocess_made(
        pipeline: dict, served: TritonClassifier, tmp_path: Path) -> None:
    """Every crop scoring sends for a 16-bit slide is, byte for byte, one preprocess wrote."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    slide = "deep_0.tif"
    shutil.copy(pipeline["source"] / "JPEGImages" / slide, inbox / slide)
    recording = _Recording(served)
    params = ScoreParams(cells=CELLS, nucleated_classes=())
    report = score_inbox(str(inbox), tmp_path / "results", recording, params,
                         ModelKey(recording.model_name, recording.model_version))
    assert report["totals"]["scored"] == 1, report
    sent = np.concatenate(recording.sent)
    assert len(sent) == pipeline["objects"][slide] > 0
    made = _shard_images(pipeline["shards"])
    matched = sum(crop.tobytes() in made for crop in sent)
    assert matched == len(sent), f"{len(sent) - matched} of {len(sent)} crops differ from training"
