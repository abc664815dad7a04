"""The augment stage and the train stage's data gate, on generated shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellpipe.data.shards import open_split, read_meta
from cellpipe.data.synthetic import open_synthetic, write_synthetic
from cellpipe.engine.checkpoint import load_model
from cellpipe.errors import InputError
from cellpipe.gan.fit import GanData
from cellpipe.gan.pool import UnlabeledPoolParams, pseudo_labelled_pool
from cellpipe.gan.quality import FeatureSpace
from cellpipe.stages import augment as augment_stage
from cellpipe.stages import train as train_stage
from cellpipe.stages.augment import AugmentStageParams, synthetic_counts
from cellpipe.stages.train import TrainParams
from conftest import write_shards

CLASSES = ("red", "green", "blue")
TINY_GAN = {"resolution": 32, "channels": 4, "z_dim": 8, "epochs": 2, "batch_size": 16,
            "sample_every": 1, "evaluate_every": 1}


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "shards", CLASSES, {"train": 30, "val": 10, "test": 10})


def _train_params(**overrides) -> TrainParams:
    base = {"backbone": "smallcnn", "weights": "none", "batch_size": 16,
            "phases": [{"trainable": "all", "epochs": 3, "lr": 0.01}]}
    return TrainParams.model_validate({**base, **overrides})


def _train(shards: Path, out: Path, params: TrainParams, synthetic: Path | None) -> dict:
    manifest = out.parent / "manifest.parquet"
    manifest.write_bytes(b"stand-in manifest")
    return train_stage.run(shards, manifest, out, out / "model.pt", params,
                           synthetic=synthetic, device="cpu")


def _split_bytes(shards: Path) -> dict[str, str]:
    return {str(p.relative_to(shards)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(shards.rglob("*")) if p.is_file()}


def test_counts_balance_up_to_the_largest_class_or_are_fixed() -> None:
    labels = np.array([0] * 50 + [1] * 10 + [2] * 30)
    names = list(CLASSES)
    assert synthetic_counts(labels, names, AugmentStageParams(enabled=True)) == {1: 40, 2: 20}
    assert synthetic_counts(labels, names, AugmentStageParams(classes=["green"], count=5)) == {1: 5}
    with pytest.raises(InputError, match="not among the classes"):
        synthetic_counts(labels, names, AugmentStageParams(classes=["purple"]))


def test_augment_writes_labelled_synthetic_train_images_with_provenance(
        shards: Path, tmp_path: Path) -> None:
    params = AugmentStageParams.model_validate(
        {"enabled": True, "classes": ["green"], "count": 12, "gan": TINY_GAN})
    before = _split_bytes(shards)
    metrics = augment_stage.run(shards, tmp_path / "out", tmp_path / "gan", params, device="cpu")
    synthetic = tmp_path / "out" / "synthetic"
    assert sorted(p.name for p in synthetic.iterdir() if p.is_dir()) == ["train"]
    part = open_synthetic(synthetic, read_meta(shards))
    assert part.images.shape == (12, 16, 16, 3) and (part.labels == 1).all()
    generator_sha = hashlib.sha256((tmp_path / "gan" / "generator.pt").read_bytes()).hexdigest()
    assert part.rows["synthetic"].all() and (part.rows["generator_sha256"] == generator_sha).all()
    assert part.rows["label"].eq("green").all() and part.rows["split"].eq("train").all()
    assert metrics["generator_sha256"] == generator_sha and metrics["synthetic_images"] == 12
    assert {"fid", "kid", "precision", "recall"} <= set(metrics)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["synthetic_per_class"] == {"green": 12}
    assert (tmp_path / "out" / "samples" / "epoch_0002.png").stat().st_size > 0
    assert _split_bytes(shards) == before, "the real shards (val, test) are never touched"


def test_disabled_augment_writes_an_empty_set_that_training_accepts(
        shards: Path, tmp_path: Path) -> None:
    metrics = augment_stage.run(shards, tmp_path / "out", tmp_path / "gan", AugmentStageParams(),
                                device="cpu")
    assert metrics == {"enabled": False, "synthetic_images": 0}
    assert pd.read_csv(tmp_path / "out" / "pseudo_labels.csv").empty
    trained = _train(shards, tmp_path / "train", _train_params(), tmp_path / "out" / "synthetic")
    assert trained["synthetic_images"] == 0 and trained["synthetic_used"] is False


def test_gan_learns_also_from_confident_pseudo_labelled_unlabeled_images(
        tmp_path: Path) -> None:
    """The probe labels the unlabeled split (its hidden truth: 20 of each class, in
    class order); only labels above the threshold and within the cap join the pool."""
    shards = write_shards(tmp_path / "shards", CLASSES,
                          {"train": 30, "val": 10, "test": 10, "unlabeled": 20})
    params = AugmentStageParams.model_validate(
        {"enabled": True, "count": 4, "gan": TINY_GAN,
         "unlabeled": {"enabled": True, "threshold": 0.6, "max_per_class": 15,
                       "max_class_ratio": 10}})
    metrics = augment_stage.run(shards, tmp_path / "out", tmp_path / "gan", params, device="cpu")
    chosen = pd.read_csv(tmp_path / "out" / "pseudo_labels.csv")
    assert len(chosen) == metrics["pseudo_labelled_images"] > 0
    assert (chosen["confidence"] >= 0.6).all()
    assert chosen["label"].value_counts().max() <= 15
    truth = [CLASSES[row // 20] for row in chosen["unlabeled_row"]]
    assert chosen["label"].tolist() == truth, "colour squares are easy: every label right"
    assert metrics["probe_val_accuracy"] == 1.0
    assert metrics["gan_train_images"] == 90 + len(chosen)
    assert metrics["pseudo_labelled_per_class"] == chosen["label"].value_counts().reindex(
        list(CLASSES), fill_value=0).to_dict()
    assert metrics["probe_predicted_per_class"] == dict.fromkeys(CLASSES, 20)
    provenance = read_meta(tmp_path / "out" / "synthetic")["synthetic"]
    assert provenance["gan_pseudo_labelled_images"] == len(chosen)
    only_green = augment_stage.run(
        shards, tmp_path / "green", tmp_path / "gan_green",
        params.model_copy(update={"classes": ["green"]}), device="cpu")
    assert only_green["gan_train_images"] == 30 + only_green["pseudo_labelled_per_class"]["green"]


def test_pseudo_labelled_gan_pool_needs_an_unlabeled_split(shards: Path, tmp_path: Path) -> None:
    params = AugmentStageParams.model_validate(
        {"enabled": True, "count": 2, "gan": TINY_GAN, "unlabeled": {"enabled": True}})
    with pytest.raises(InputError, match="augment.unlabeled.enabled needs an 'unlabeled' split"):
        augment_stage.run(shards, tmp_path / "out", tmp_path / "gan", params, device="cpu")


def test_pseudo_labelled_pool_with_one_class_or_no_unlabeled_images(tmp_path: Path) -> None:
    """One labelled class: a clear error (a probe needs two). An empty unlabeled split:
    the GAN learns from train alone, and says so."""
    params = UnlabeledPoolParams(enabled=True)
    images = np.zeros((4, 16, 16, 3), np.uint8)
    one_class = GanData(images, np.zeros(4, np.int64))
    with pytest.raises(InputError, match="two classes or more; train has 1"):
        pseudo_labelled_pool(one_class, images, one_class, list(CLASSES), params, FeatureSpace())
    two_classes = GanData(images, np.array([0, 0, 1, 1]))
    pool, chosen, metrics = pseudo_labelled_pool(two_classes, images[:0], two_classes,
                                                 list(CLASSES), params, FeatureSpace())
    assert pool is two_classes and chosen.empty and metrics["pseudo_labelled_images"] == 0


def test_synthetic_folder_with_a_val_split_is_refused(shards: Path, tmp_path: Path) -> None:
    meta = read_meta(shards)
    folder = tmp_path / "synthetic"
    write_synthetic(folder, meta, np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 1]),
                    provenance={"generator_sha256": "0" * 64})
    (folder / "val").mkdir()
    with pytest.raises(InputError, match="never validation or test"):
        open_synthetic(folder, meta)
    with pytest.raises(InputError, match="image_size"):
        open_synthetic(_other_size(folder, meta), meta)


def _other_size(folder: Path, meta: dict) -> Path:
    other = folder.parent / "other"
    write_synthetic(other, {**meta, "image_size": 8}, np.zeros((1, 8, 8, 3), np.uint8),
                    np.array([0]), provenance={"generator_sha256": "1" * 64})
    return other


def _mislabelled_synthetic(shards: Path, folder: Path) -> None:
    """'Synthetic' images that hurt: real train images under the wrong class."""
    train = open_split(shards, "train")
    wrong = (train.labels + 1) % len(CLASSES)
    images = np.concatenate([train.images] * 3)
    write_synthetic(folder, read_meta(shards), images, np.concatenate([wrong] * 3),
                    provenance={"generator_sha256": "f" * 64, "sample_seed": 0})


def test_gate_rejects_synthetic_data_that_does_not_help(shards: Path, tmp_path: Path) -> None:
    synthetic = tmp_path / "bad"
    _mislabelled_synthetic(shards, synthetic)
    gated = _train(shards, tmp_path / "gated", _train_params(), synthetic)
    assert gated["synthetic_used"] is False and gated["synthetic_images"] == 270
    assert gated["val_macro_f1_gain_lower_bound"] < 0
    assert gated["val_macro_f1_with_synthetic"] < gated["val_macro_f1_without_synthetic"]
    assert gated["val_macro_f1"] == gated["val_macro_f1_without_synthetic"]
    plain = _train(shards, tmp_path / "plain", _train_params(), None)
    assert gated["val_macro_f1"] == plain["val_macro_f1"], "rejected data leaves no trace"
    assert load_model(tmp_path / "gated" / "model.pt").info["data_gate"]["synthetic_used"] is False

    forced = _train(shards, tmp_path / "forced", _train_params(synthetic="always"), synthetic)
    assert forced["synthetic_used"] is True
    assert forced["val_macro_f1"] == forced["val_macro_f1_with_synthetic"]


def test_cross_validated_gate_judges_every_labelled_image(shards: Path, tmp_path: Path) -> None:
    """With synthetic_folds the evidence is out-of-fold over train + val (90 + 30 images),
    and the synthetic images only ever join the training folds."""
    synthetic = tmp_path / "bad"
    _mislabelled_synthetic(shards, synthetic)
    out = tmp_path / "gated"
    gated = _train(shards, out, _train_params(synthetic_folds=3), synthetic)
    assert gated["synthetic_used"] is False and gated["synthetic_folds"] == 3
    assert gated["cv_macro_f1_with_synthetic"] < gated["cv_macro_f1_without_synthetic"]
    assert gated["val_macro_f1_gain_lower_bound"] < 0
    folds = sorted(p.stem for p in (out / "checkpoints").glob("gate_fold*.pt"))
    assert folds == [f"gate_fold{k}{arm}" for k in range(3) for arm in ("", "_synthetic")]
    plain = _train(shards, tmp_path / "plain", _train_params(), None)
    assert gated["val_macro_f1"] == plain["val_macro_f1"], "rejected data leaves no trace"


def test_cross_validated_gate_needs_enough_images_per_class(shards: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synthetic_folds"):
        _train_params(synthetic_folds=1)
    synthetic = tmp_path / "bad"
    _mislabelled_synthetic(shards, synthetic)
    with pytest.raises(InputError, match="synthetic_folds is 50"):
        _train(shards, tmp_path / "gated", _train_params(synthetic_folds=50), synthetic)
