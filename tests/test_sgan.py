"""The semi-supervised GAN method: its losses, and that it runs through the same stages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cellpipe.engine.checkpoint import load_checkpoint, load_model
from cellpipe.errors import InputError
from cellpipe.gan.nets import Generator
from cellpipe.methods.sgan import SemiSupervisedGan, discriminator_loss, feature_matching_loss
from cellpipe.stages import evaluate as evaluate_stage
from cellpipe.stages import train as train_stage
from cellpipe.stages.train import TrainParams
from conftest import assert_same_classifier, train_uninterrupted_and_killed, write_shards

CLASSES = ("red", "green", "blue")


def _params(**overrides) -> TrainParams:
    base = {"backbone": "smallcnn", "weights": "none", "batch_size": 16, "method": "sgan",
            "phases": [{"trainable": "all", "epochs": 3, "lr": 0.01}],
            "sgan": {"steps_per_epoch": 4, "channels": 8, "z_dim": 16}}
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


def test_sgan_losses_by_hand() -> None:
    # Logits (0, 0): Z = 2, so D(x) = 2/3. Real: -log(2/3); generated: -log(1/3).
    zeros = torch.zeros(1, 2)
    no_supervision = nn.Module()
    no_supervision.forward = lambda logits, labels: torch.zeros(())
    loss, unsupervised = discriminator_loss(zeros, torch.zeros(1, dtype=torch.long), zeros,
                                            zeros, no_supervision, unlabeled_weight=2.0)
    assert unsupervised.item() == pytest.approx(math.log(1.5) + math.log(3))
    assert loss.item() == pytest.approx(2 * (math.log(1.5) + math.log(3)))
    # A confident "some class" on a generated image costs about its logit (log Z).
    _, confident = discriminator_loss(zeros, torch.zeros(1, dtype=torch.long), zeros,
                                      torch.tensor([[20.0, 0.0]]), no_supervision, 1.0)
    assert confident.item() == pytest.approx(math.log(1.5) + 20, abs=1e-6)
    real, generated = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0]] * 2)
    assert feature_matching_loss(real, generated).item() == pytest.approx(2.0 ** 2 + 3.0 ** 2)


def test_sgan_trains_a_k_class_classifier_that_evaluate_reads(shards: Path, manifest: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    metrics = train_stage.run(shards, manifest, out, out / "model.pt", _params(), device="cpu")
    assert metrics["epochs"] == 3 and metrics["val_macro_f1"] > 0.9
    trained = load_model(out / "model.pt")
    assert trained.info["params"]["method"] == "sgan"
    assert trained.classifier.head[-1].out_features == len(CLASSES)  # K, "generated" implied
    assert (out / "sgan_generated.png").stat().st_size > 0
    (out / "evaluate").mkdir()
    report = evaluate_stage.evaluate(out / "model.pt", shards, out / "evaluate",
                                     out / "calibration.json", evaluate_stage.EvaluateParams())
    assert report["accuracy"] > 0.9


def test_sgan_generator_trains_and_resumes_with_the_classifier(
        shards: Path, manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params()
    killed, uninterrupted = train_uninterrupted_and_killed(SemiSupervisedGan, shards, manifest,
                                                           tmp_path, params, monkeypatch)
    saved = load_checkpoint(killed / "checkpoints" / "round0.pt")
    assert saved["epoch"] == 2
    torch.manual_seed(params.sgan.seed)  # how the objective builds its generator
    initial = Generator(1, 32, z_dim=16, channels=8).state_dict()
    trained = saved["objective"]["generator"]
    assert not torch.equal(trained["project.weight"], initial["project.weight"]), \
        "the generator trains, and its weights are checkpointed"
    train_stage.run(shards, manifest, killed, killed / "model.pt", params, device="cpu")
    assert_same_classifier(killed, uninterrupted)


def test_sgan_without_an_unlabeled_split_says_so(tmp_path: Path, manifest: Path) -> None:
    shards = write_shards(tmp_path / "shards", CLASSES, {"train": 5, "val": 5})
    with pytest.raises(InputError, match="method sgan needs an 'unlabeled' split"):
        train_stage.run(shards, manifest, tmp_path / "out", tmp_path / "out" / "model.pt",
                        _params(), device="cpu")
