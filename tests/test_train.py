"""The training stage on generated shards: phases, early stopping, resume, pseudo-labels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cellpipe.contract import to_model_input
from cellpipe.data.shards import open_split
from cellpipe.engine.checkpoint import load_model
from cellpipe.stages import train as train_stage
from cellpipe.stages.train import TrainParams
from conftest import write_shards

CLASSES = ("red", "green", "blue")


def _params(**overrides) -> TrainParams:
    base = {"backbone": "smallcnn", "weights": "none", "batch_size": 16,
            "phases": [{"trainable": "all", "epochs": 3, "lr": 0.01}]}
    return TrainParams.model_validate({**base, **overrides})


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "shards", CLASSES, {"train": 30, "val": 10, "test": 10})


def _run(shards: Path, manifest: Path, out: Path, params: TrainParams) -> dict:
    return train_stage.run(shards, manifest, out, out / "model.pt", params, device="cpu")


def test_training_learns_and_checkpoint_describes_itself(shards: Path, manifest: Path,
                                                         tmp_path: Path) -> None:
    metrics = _run(shards, manifest, tmp_path / "out", _params())
    assert metrics["val_macro_f1"] > 0.9 and metrics["epochs"] == 3
    trained = load_model(tmp_path / "out" / "model.pt")
    assert trained.contract.class_names == CLASSES and trained.contract.image_size == 16
    assert trained.info["backbone"] == "smallcnn" and len(trained.info["manifest_sha256"]) == 64
    assert trained.info["params"]["phases"][0]["epochs"] == 3
    test = open_split(shards, "test")
    inputs = torch.from_numpy(to_model_input(np.asarray(test.images), trained.contract))
    with torch.no_grad():
        accuracy = (trained.classifier(inputs).argmax(1).numpy() == test.labels).mean()
    assert accuracy > 0.9
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_truncated_backbone_trains_and_reloads_from_its_checkpoint(
        shards: Path, manifest: Path, tmp_path: Path) -> None:
    _run(shards, manifest, tmp_path / "out", _params(backbone_blocks=2))
    trained = load_model(tmp_path / "out" / "model.pt")
    assert trained.info["backbone_blocks"] == 2 and len(trained.classifier.blocks) == 2
    assert trained.classifier.head[1].in_features == 64  # smallcnn's second stage
    test = open_split(shards, "test")
    inputs = torch.from_numpy(to_model_input(np.asarray(test.images), trained.contract))
    with torch.no_grad():  # the weights that trained, not a fresh network's
        accuracy = (trained.classifier(inputs).argmax(1).numpy() == test.labels).mean()
    assert accuracy > 0.9


def test_head_phase_on_cached_features_leaves_the_backbone_untouched(
        shards: Path, manifest: Path, tmp_path: Path) -> None:
    # Phase 1 barely moves (tiny lr), so the best weights come from phase 2.
    params = _params(phases=[{"trainable": "head", "epochs": 2, "lr": 1e-7},
                             {"trainable": 2, "epochs": 2, "lr": 0.01}])
    _run(shards, manifest, tmp_path / "out", params)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert history["cached_features"].tolist() == [True, True, False, False]
    assert history["val_macro_f1"].iloc[2:].max() > history["val_macro_f1"].iloc[:2].max()
    trained = load_model(tmp_path / "out" / "model.pt")
    torch.manual_seed(params.seed)  # as train does before building the backbone
    reference = train_stage.build_backbone("smallcnn", "none")
    stages = trained.classifier.blocks
    # The first two stages never trained; the last two did (phase 2: trainable 2).
    for index, block in enumerate(stages):
        pairs = zip(block.parameters(), reference.blocks[index].parameters(), strict=True)
        unchanged = all(torch.equal(a, b) for a, b in pairs)
        assert unchanged == (index < 2), f"stage {index}"


def test_early_stopping_ends_a_phase_without_progress(shards: Path, manifest: Path,
                                                      tmp_path: Path) -> None:
    params = _params(early_stopping_patience=2,
                     phases=[{"trainable": "all", "epochs": 10, "lr": 1e-12}])
    metrics = _run(shards, manifest, tmp_path / "out", params)
    assert metrics["epochs"] == 3  # the first epoch sets the best, two more without progress


def test_pseudo_labels_enter_training_within_threshold_and_cap(tmp_path: Path,
                                                               manifest: Path) -> None:
    shards = write_shards(tmp_path / "shards", CLASSES,
                          {"train": 10, "val": 10, "test": 10, "unlabeled": 40})
    params = _params(method="pseudo_label",
                     pseudo_label={"rounds": 1, "threshold": 0.6, "max_per_class": 15,
                                   "max_class_ratio": 1.5})
    metrics = _run(shards, manifest, tmp_path / "out", params)
    chosen = pd.read_csv(tmp_path / "out" / "pseudo_labels.csv")
    assert metrics["pseudo_labels"] == len(chosen) > 0
    assert (chosen["confidence"] >= 0.6).all()
    per_class = chosen["label"].value_counts()
    assert per_class.max() <= 15 and per_class.max() <= 1.5 * per_class.min()
    # The generated unlabeled rows are in class order, 40 per class: labels should match.
    assert (chosen["label"] == chosen["unlabeled_row"] // 40).mean() > 0.9


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(shards: Path, manifest: Path,
                                                              tmp_path: Path) -> None:
    write_shards(shards, CLASSES, {"train": 200, "val": 30}, size=32)  # slower epochs
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": {
        "backbone": "smallcnn", "weights": "none", "batch_size": 16,
        "phases": [{"trainable": "head", "epochs": 2, "lr": 0.01},
                   {"trainable": "all", "epochs": 6, "lr": 0.01}]}}))

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "cellpipe", "train", "--shards", str(shards),
                "--manifest", str(manifest), "--out", str(out), "--model", str(out / "model.pt"),
                "--params", str(params_file), "--device", "cpu"]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen(command(tmp_path / "a"), stderr=subprocess.PIPE, text=True, env=env)
    for line in killed.stderr:
        if "phase 2/2 epoch 2:" in line:  # logged once that epoch's checkpoint is on disk
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=120)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "a" / "model.pt").exists()

    resumed = subprocess.run(command(tmp_path / "a"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after phase 2 epoch" in resumed.stderr
    assert "phase 1/2" not in resumed.stderr.split("resuming", 1)[1]  # phase 1 is not redone
    subprocess.run(command(tmp_path / "b"), check=True, capture_output=True, env=env)

    after_kill, uninterrupted = (load_model(tmp_path / name / "model.pt") for name in "ab")
    for (key, a), b in zip(after_kill.classifier.state_dict().items(),
                           uninterrupted.classifier.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{key} differs after resume"
    history = pd.read_csv(tmp_path / "a" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 9))
    # Tracked files hold no wall-clock time, so a resumed run writes the same bytes.
    assert "seconds" not in history.columns
    for name in ("history.csv", "metrics.json", "model.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
