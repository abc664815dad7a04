"""FixMatch: its loss, its two views, and that it runs (and resumes) through the stages."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cellpipe.engine.checkpoint import load_checkpoint, load_model
from cellpipe.engine.data import TrainAugmentParams, build_train_augmentation
from cellpipe.errors import InputError
from cellpipe.methods.fixmatch import (
    FixMatch,
    FixMatchParams,
    TwoViews,
    build_strong_augment,
    consistency_loss,
)
from cellpipe.stages import evaluate as evaluate_stage
from cellpipe.stages import train as train_stage
from cellpipe.stages.train import TrainParams
from conftest import assert_same_classifier, train_uninterrupted_and_killed, write_shards

CLASSES = ("red", "green", "blue")


def _params(**overrides) -> TrainParams:
    base = {"backbone": "smallcnn", "weights": "none", "batch_size": 8, "method": "fixmatch",
            "label_smoothing": 0.0,
            "phases": [{"trainable": "all", "epochs": 3, "lr": 0.01}],
            "fixmatch": {"steps_per_epoch": 4, "threshold": 0.8, "unlabeled_ratio": 2}}
    return TrainParams.model_validate({**base, **overrides})


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "shards", CLASSES,
                        {"train": 10, "val": 10, "test": 10, "unlabeled": 40})


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.parquet"
    path.write_bytes(b"stand-in manifest")
    return path


NO_AUGMENTATION = TrainAugmentParams(flips=False, rotate90=False, affine_degrees=0,
                                     affine_translate=0, affine_scale=0, brightness=0,
                                     contrast=0, saturation=0, hue=0)


def test_consistency_loss_by_hand() -> None:
    # Weak view: image 0 is confident (p = 1/(1+e^-10) ≈ 0.99995) on class 0, image 1 is
    # 50/50 and carries no label. Strong view: image 0 at logits (0, 0) costs log 2.
    weak = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    strong = torch.tensor([[0.0, 0.0], [5.0, 0.0]], requires_grad=True)
    loss, labels = consistency_loss(weak, strong, threshold=0.95)
    assert labels.tolist() == [0, -1]
    assert loss.item() == pytest.approx(math.log(2) / 2)  # averaged over both images
    loss.backward()
    assert torch.count_nonzero(strong.grad[1]) == 0, "an unconfident image teaches nothing"
    # The label is the weak view's arg-max: class 0, so the gradient lowers logit 1.
    assert strong.grad[0, 0] < 0 < strong.grad[0, 1]
    nothing, no_labels = consistency_loss(weak, strong, threshold=1.0)
    assert nothing.item() == 0 and no_labels.tolist() == [-1, -1]



def test_distribution_alignment_by_hand() -> None:
    # p(weak) = (0.9, 0.1) is confident on class 0 alone. If the model has been putting
    # 0.9 of its mass on class 0 across unlabelled images, alignment towards uniform
    # scales by (0.5/0.9, 0.5/0.1): (0.5, 0.5) after renormalising, no longer a label.
    weak = torch.log(torch.tensor([[0.9, 0.1]]))
    strong = torch.zeros(1, 2)
    _, unaligned = consistency_loss(weak, strong, threshold=0.85)
    assert unaligned.tolist() == [0]
    alignment = torch.tensor([0.5 / 0.9, 0.5 / 0.1])
    _, aligned = consistency_loss(weak, strong, threshold=0.85, alignment=alignment)
    assert aligned.tolist() == [-1]


def test_distribution_alignment_tracks_the_running_mean_of_predictions(shards: Path) -> None:
    from cellpipe.data.shards import read_meta
    from cellpipe.nets.registry import build_backbone
    from cellpipe.stages.train import make_contract

    contract = make_contract(read_meta(shards), build_backbone("smallcnn", "none"), _params())
    images = np.zeros((12, 16, 16, 3), np.uint8)
    identity = build_train_augmentation(NO_AUGMENTATION)
    params = FixMatchParams(distribution_alignment=True, alignment_momentum=0.5)
    objective = FixMatch(TwoViews(images, identity, identity), contract, params, batch_size=4)
    assert objective._alignment(torch.zeros(4, 3)).tolist() == pytest.approx([1, 1, 1])
    leaning = torch.log(torch.tensor([[0.7, 0.2, 0.1]] * 4))
    alignment = objective._alignment(leaning)  # running mean: (1/3 + p) / 2
    expected = (1 / 3) / ((torch.tensor([0.7, 0.2, 0.1]) + 1 / 3) / 2)
    assert alignment.tolist() == pytest.approx(expected.tolist())
    resumed = FixMatch(TwoViews(images, identity, identity), contract, params, batch_size=4)
    resumed.load_state_dict(objective.state_dict())
    assert torch.equal(resumed.running_mean, objective.running_mean)
    off = FixMatch(TwoViews(images, identity, identity), contract, FixMatchParams(), 4)
    assert off._alignment(leaning) is None

def test_two_views_are_uint8_images_and_the_strong_one_differs_more() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    no_weak = build_train_augmentation(NO_AUGMENTATION)
    strong = build_strong_augment(no_weak, FixMatchParams(strong_ops=2, strong_magnitude=15,
                                                          erase_probability=1.0))
    views = TwoViews(images, no_weak, strong)
    for index in range(len(views)):
        weak_view, strong_view = views[index]
        assert weak_view.dtype == strong_view.dtype == np.uint8
        assert weak_view.shape == strong_view.shape == (32, 32, 3)
        np.testing.assert_array_equal(weak_view, images[index])
        assert not np.array_equal(strong_view, images[index])


def test_fixmatch_labels_unlabelled_images_and_trains_a_classifier_evaluate_reads(
        shards: Path, manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="cellpipe.methods.fixmatch"):
        metrics = train_stage.run(shards, manifest, out, out / "model.pt", _params(),
                                  device="cpu")
    epochs = [record.getMessage() for record in caplog.records
              if "unlabelled views above" in record.getMessage()]
    assert len(epochs) == 3, "one line per epoch"
    last = re.search(r"(\d+)% of unlabelled views above the 0.80 threshold \(per class "
                     r"\{'red': (\d+), 'green': (\d+), 'blue': (\d+)\}", epochs[-1])
    assert last is not None, epochs[-1]
    assert int(last[1]) > 50, "the model becomes confident on unlabelled images"
    per_class = sum(int(count) for count in last.groups()[1:])
    assert per_class == pytest.approx(int(last[1]) / 100 * 4 * 16, abs=1), \
        "the per-class counts add up to the labelled share of 4 steps × 16 images"
    assert metrics["epochs"] == 3 and metrics["val_macro_f1"] > 0.9
    trained = load_model(out / "model.pt")
    assert trained.info["params"]["method"] == "fixmatch"
    (out / "evaluate").mkdir()
    report = evaluate_stage.evaluate(out / "model.pt", shards, out / "evaluate",
                                     out / "calibration.json", evaluate_stage.EvaluateParams())
    assert report["accuracy"] > 0.9


def test_fixmatch_resumes_after_a_kill_to_the_same_weights(
        shards: Path, manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params()
    killed, uninterrupted = train_uninterrupted_and_killed(FixMatch, shards, manifest,
                                                           tmp_path, params, monkeypatch)
    assert load_checkpoint(killed / "checkpoints" / "round0.pt")["epoch"] == 2
    train_stage.run(shards, manifest, killed, killed / "model.pt", params, device="cpu")
    assert_same_classifier(killed, uninterrupted)


def test_fixmatch_errors_name_what_is_missing(tmp_path: Path, manifest: Path) -> None:
    no_unlabeled = write_shards(tmp_path / "shards", CLASSES, {"train": 5, "val": 5})
    with pytest.raises(InputError, match="method fixmatch needs an 'unlabeled' split"):
        train_stage.run(no_unlabeled, manifest, tmp_path / "out", tmp_path / "out" / "model.pt",
                        _params(), device="cpu")
    few = write_shards(tmp_path / "few", CLASSES, {"train": 5, "val": 5, "unlabeled": 2})
    with pytest.raises(ValueError, match="at least one batch of unlabeled images"):
        train_stage.run(few, manifest, tmp_path / "out2", tmp_path / "out2" / "model.pt",
                        _params(), device="cpu")


def test_a_threshold_label_smoothing_puts_out_of_reach_is_warned_about(
        shards: Path, manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Three classes, smoothing 0.3: the true class is trained towards 1 - 0.3 * 2/3 = 0.8.
    params = _params(label_smoothing=0.3, phases=[{"trainable": "all", "epochs": 1, "lr": 0.01}])
    with caplog.at_level(logging.WARNING, logger="cellpipe.methods.fixmatch"):
        train_stage.run(shards, manifest, tmp_path / "out", tmp_path / "out" / "model.pt",
                        params, device="cpu")
    assert "at or above 0.800" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cellpipe.methods.fixmatch"):
        train_stage.run(shards, manifest, tmp_path / "out2", tmp_path / "out2" / "model.pt",
                        params.model_copy(update={"label_smoothing": 0.1}), device="cpu")
    assert "at or above" not in caplog.text
