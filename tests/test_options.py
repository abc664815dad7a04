"""Options that no default exercises: each test pins the option's observable effect.

Each test drives the stage's public ``run()`` on tiny generated data and looks at what
the option must change (manifest columns, the criterion the loop calls, the GAN's
optimiser step counters, BatchNorm running statistics, backbone passes, config.pbtxt),
so that an option that is ignored, or wired to the wrong thing, fails here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from google.protobuf import json_format, text_format
from pydantic import BaseModel
from torch import nn
from tritonclient.grpc import model_config_pb2

import cellpipe.serving
from cellpipe.data.manifest import read_manifest
from cellpipe.data.shards import open_split
from cellpipe.nets.smallcnn import SmallCNN
from cellpipe.stages import augment as augment_stage
from cellpipe.stages import export as export_stage
from cellpipe.stages import ingest as ingest_stage
from cellpipe.stages import preprocess as preprocess_stage
from cellpipe.stages import publish as publish_stage
from cellpipe.stages import train as train_stage
from conftest import write_shards, write_voc_slide

CLASSES = ("red", "green", "blue")
NO_AUGMENT = {"flips": False, "rotate90": False, "affine_degrees": 0, "affine_translate": 0,
              "affine_scale": 0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}


def _params(stage: types.ModuleType, values: dict) -> BaseModel:
    """``values`` as the params class that the stage's ``run()`` takes.

    Found from run's signature rather than by class name: the classes get renamed
    (e.g. augment's), the stage's run() and its ``params`` argument stay.
    """
    return typing.get_type_hints(stage.run)["params"].model_validate(values)


def _train_params(**overrides: object) -> BaseModel:
    base = {"backbone": "smallcnn", "weights": "none", "batch_size": 16,
            "phases": [{"trainable": "all", "epochs": 1, "lr": 0.01}]}
    return _params(train_stage, {**base, **overrides})


def _train(shards: Path, out: Path, params: BaseModel) -> dict:
    manifest = out / "manifest.parquet"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_bytes(b"stand-in manifest: only its hash is used by train")
    return train_stage.run(shards, manifest, out, out / "model.pt", params, device="cpu")


def _saved_weights(model_path: Path) -> dict[str, torch.Tensor]:
    """The classifier's state dict as the train stage saved it (our own file: full unpickle)."""
    return torch.load(model_path, map_location="cpu", weights_only=False)["state_dict"]


def _shards_with_counts(root: Path, classes: Sequence[str], train_counts: Sequence[int],
                        val_per_class: int, size: int = 16, seed: int = 0) -> Path:
    """Shards whose train split has ``train_counts[k]`` images of class k (val balanced)."""
    return write_shards(root, classes, {"train": list(train_counts), "val": val_per_class},
                        size=size, seed=seed)


# --- ingest.voc.square ---------------------------------------------------------------------


@pytest.mark.parametrize("square", [False, True])
def test_voc_square_false_keeps_the_box_aspect_square_true_squares_it(
        tmp_path: Path, square: bool) -> None:
    """ingest.voc.square: a 40×20 box with pad_fraction 0.25 becomes a 60×40 crop (each
    axis grown by 0.25 × the longer side, 10 px, on both sides) when false, and a 60×60
    square around the same centre when true; the manifest records the geometry, and the
    preprocess stage letterboxes only the non-square crop."""
    source = tmp_path / "source"
    write_voc_slide(source, "slide", [("a", (40, 30, 80, 50))])  # centre (60, 40), 40×20
    params = _params(ingest_stage, {
        "layout": "voc", "classes": ["a"],
        "voc": {"pad_fraction": 0.25, "square": square, "border": "fill"},
        "split": {"val_fraction": 0, "test_fraction": 0}})
    ingest_stage.run(source, tmp_path / "ingest", params, workers=1)
    manifest = read_manifest(tmp_path / "ingest" / "manifest.parquet")
    (crop,) = manifest.rows.to_dict(orient="records")
    expected = ((30, 10, 90, 70) if square else (30, 20, 90, 60))
    assert (crop["x0"], crop["y0"], crop["x1"], crop["y1"]) == expected
    assert (crop["width"], crop["height"]) == ((60, 60) if square else (60, 40))
    assert manifest.crop is not None and manifest.crop.square is square

    # The crop reaches the pixels: padded to 16 px with white (255; the slide is 185–215
    # gray, the object red), a 60×40 crop leaves 16 × 10/60 ≈ 2.7 px bars top and bottom.
    preprocess_stage.run(tmp_path / "ingest" / "manifest.parquet", source, tmp_path / "pre",
                         _params(preprocess_stage, {"image_size": 16, "pad_value": 255}),
                         workers=1)
    (image,) = open_split(tmp_path / "pre" / "shards", "train").images
    bars = np.concatenate([image[:2], image[-2:]])
    if square:
        assert (bars < 250).all(), "a square crop fills the square: no letterbox"
    else:
        assert (bars == 255).all(), "a 3:2 crop is letterboxed top and bottom"
        rows = image[3:-3]  # between the bars, the crop spans the full width
        assert (rows[:, :2] < 250).all() and (rows[:, -2:] < 250).all(), "no side bars"


# --- train.balance: loss -------------------------------------------------------------------


def test_balance_loss_weights_the_criterion_by_inverse_class_frequency(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.balance: loss trains with cross-entropy weighted n / (k · n_c) per class
    (24 + 6 images: 0.625 and 2.5) and leaves the sampling alone (one epoch sees each
    image once: 24 and 6 targets); balance: none trains with an unweighted criterion."""
    shards = _shards_with_counts(tmp_path / "shards", ("major", "minor"), (24, 6), 6)
    calls: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    real_forward = nn.CrossEntropyLoss.forward

    def recording_forward(self: nn.CrossEntropyLoss, logits: torch.Tensor,
                          target: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.detach().clone()
        calls.append((weight, target.detach().clone()))
        return real_forward(self, logits, target)

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", recording_forward)
    phases = [{"trainable": "head", "epochs": 1, "lr": 0.01}]  # cached features: fast

    _train(shards, tmp_path / "loss", _train_params(balance="loss", phases=phases, batch_size=8))
    assert calls, "the training loop never called its criterion"
    for weight, _ in calls:
        assert weight is not None, "balance: loss trained with an unweighted criterion"
        torch.testing.assert_close(weight, torch.tensor([30 / (2 * 24), 30 / (2 * 6)]))
    seen = torch.bincount(torch.cat([target for _, target in calls]), minlength=2)
    assert seen.tolist() == [24, 6], "balance: loss must not also resample the classes"

    calls.clear()
    _train(shards, tmp_path / "none", _train_params(balance="none", phases=phases, batch_size=8))
    assert calls and all(weight is None for weight, _ in calls)


# --- augment.gan.critic_steps --------------------------------------------------------------


def test_gan_critic_steps_is_discriminator_updates_per_generator_update(tmp_path: Path) -> None:
    """augment.gan.critic_steps: in the GAN's saved run state, the discriminator's Adam
    has taken critic_steps (3) × as many steps as the generator's, which took one per
    batch (30 green train images, batches of 8 → 3 batches, 1 epoch → 3). One short run:
    the stage's FID/KID evaluation of the final epoch is much of its cost."""
    critic_steps = 3
    shards = write_shards(tmp_path / "shards", CLASSES, {"train": 30, "val": 10, "test": 2})
    params = _params(augment_stage, {
        "enabled": True, "classes": ["green"], "count": 4,
        "gan": {"resolution": 32, "channels": 4, "z_dim": 8, "epochs": 1, "batch_size": 8,
                "diffaugment": [], "critic_steps": critic_steps}})
    augment_stage.run(shards, tmp_path / "out", tmp_path / "gan", params, device="cpu")
    state = torch.load(tmp_path / "out" / "checkpoints" / "gan.pt", map_location="cpu",
                       weights_only=False)

    def steps(optimizer: dict) -> set[int]:
        return {int(parameter["step"]) for parameter in optimizer["state"].values()}

    assert steps(state["optimizer_generator"]) == {3}
    assert steps(state["optimizer_discriminator"]) == {3 * critic_steps}


# --- train.freeze_pretrained_bn ------------------------------------------------------------


def _running_stats(weights: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in weights.items()
            if key.startswith(prefix) and ("running_" in key or "num_batches_tracked" in key)}


@pytest.mark.parametrize(("pretrained", "freeze", "stats_move"), [
    (True, True, False),   # the option's purpose: pretrained statistics are kept
    (True, False, True),   # switched off: BatchNorm learns the batches' statistics
    (False, True, True),   # nothing pretrained to keep (weights: none): the flag is moot
])
def test_freeze_pretrained_bn_keeps_pretrained_running_stats(
        tmp_path: Path, pretrained: bool, freeze: bool, stats_move: bool) -> None:
    """train.freeze_pretrained_bn: fine-tuning every layer of a backbone loaded from a
    weights file leaves its BatchNorm running statistics exactly as loaded when true and
    moves them when false, while the conv weights train either way; from scratch
    (weights: none) the statistics always follow the data."""
    shards = write_shards(tmp_path / "shards", CLASSES, {"train": 16, "val": 4, "test": 2})
    torch.manual_seed(0)
    initial = SmallCNN().state_dict()
    weights = "none"
    if pretrained:  # a "pretrained" backbone available offline: a state dict on disk
        weights = str(tmp_path / "smallcnn.pth")
        torch.save(initial, weights)
    params = _train_params(weights=weights, freeze_pretrained_bn=freeze,
                           phases=[{"trainable": "all", "epochs": 1, "lr": 0.01}])
    _train(shards, tmp_path / "out", params)
    trained = _saved_weights(tmp_path / "out" / "model.pt")

    before, after = _running_stats(initial), _running_stats(trained, "backbone.")
    assert before.keys() == after.keys() and len(before) == 3 * 8  # 8 BatchNorm layers
    moved = [key for key in before if not torch.equal(before[key], after[key])]
    if stats_move:
        assert len(moved) == len(before), f"only {moved} moved"
    else:
        assert moved == [], f"pretrained BatchNorm statistics changed: {moved}"
    if pretrained:  # the convolutions did fine-tune from the loaded weights
        conv = "stages.0.0.weight"
        assert not torch.equal(initial[conv], trained[f"backbone.{conv}"])


# --- train.cache_frozen_features: false ----------------------------------------------------


def test_head_training_without_the_feature_cache_matches_the_cached_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.cache_frozen_features: false trains the head on backbone passes of the images
    in every epoch (3 epochs × (48 train + 18 val) = 198 images through the backbone,
    against 66 once with the cache), and, with the augmentations and dropout off, ends
    at the same head as the cached run: the frozen backbone is in eval mode both ways,
    so only float rounding of other batch compositions differs (atol 1e-5)."""
    shards = write_shards(tmp_path / "shards", CLASSES, {"train": 16, "val": 6, "test": 2})
    passes = {"images": 0}
    real_forward = SmallCNN.forward

    def counting_forward(self: SmallCNN, images: torch.Tensor) -> torch.Tensor:
        passes["images"] += len(images)
        return real_forward(self, images)

    monkeypatch.setattr(SmallCNN, "forward", counting_forward)
    runs = {}
    for cache in (True, False):
        passes["images"] = 0
        params = _train_params(cache_frozen_features=cache, dropout=0.0, augment=NO_AUGMENT,
                               phases=[{"trainable": "head", "epochs": 3, "lr": 0.01}])
        out = tmp_path / f"cache_{cache}"
        _train(shards, out, params)
        history = pd.read_csv(out / "history.csv")
        runs[cache] = (passes["images"], history, _saved_weights(out / "model.pt"))

    (cached_passes, cached_history, cached), (plain_passes, plain_history, plain) = (
        runs[True], runs[False])
    assert cached_history["cached_features"].tolist() == [True] * 3
    assert plain_history["cached_features"].tolist() == [False] * 3
    assert (cached_passes, plain_passes) == (48 + 18, 3 * (48 + 18))
    for key in ("head.1.weight", "head.1.bias"):
        torch.testing.assert_close(plain[key], cached[key], atol=1e-5, rtol=0)
    for key in cached:  # the frozen backbone is untouched either way
        if key.startswith("backbone."):
            assert torch.equal(plain[key], cached[key]), key
    np.testing.assert_allclose(plain_history["train_loss"], cached_history["train_loss"],
                               atol=1e-5)
    assert plain_history["val_macro_f1"].tolist() == cached_history["val_macro_f1"].tolist()


# --- publish.onnx_threads ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained smallcnn, exported to ONNX by the export stage."""
    root = tmp_path_factory.mktemp("exported")
    shards = write_shards(root / "shards", CLASSES, {"train": 8, "val": 4, "test": 2})
    _train(shards, root / "train", _train_params(batch_size=8))
    (root / "calibration.json").write_text(json.dumps({"temperature": 1.0}))
    export_stage.run(root / "train" / "model.pt", root / "calibration.json", shards,
                     root / "export", _params(export_stage, {}))
    return root / "export"


def _bundled_onnxruntime_backend(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The Python ``onnxruntime`` Triton backend cellpipe bundles, importable off-server
    (its ``triton_python_backend_utils`` import, used only per request, stubbed)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        types.ModuleType("triton_python_backend_utils"))
    path = Path(cellpipe.serving.__file__).parent / "triton_python" / "onnxruntime_backend.py"
    spec = importlib.util.spec_from_file_location("cellpipe_test_onnxruntime_backend", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("threads", [0, 3])
def test_onnx_threads_reaches_config_pbtxt_and_the_served_session(
        exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """publish.onnx_threads: the published classifier's config.pbtxt carries it as the
    onnxruntime backend parameter intra_op_thread_count (absent or "0" = onnxruntime's
    default, every core), and the bundled backend, given that config as Triton passes it
    (JSON), opens its session with that many intra-op threads."""
    monkeypatch.chdir(tmp_path)  # no local Triton state here: publish writes the repo only
    repository = tmp_path / "triton_repo"
    params = _params(publish_stage, {"onnx_threads": threads})
    result = publish_stage.run(exported, repository, tmp_path / "report.json", params)
    assert result["action"] == "published" and result["server"] is None

    config_dir = repository / params.model_name
    config = text_format.Parse((config_dir / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx"
    written = config.parameters.get("intra_op_thread_count")
    if threads:
        assert written is not None and written.string_value == str(threads)
    else:
        assert written is None or written.string_value == "0"

    backend = _bundled_onnxruntime_backend(monkeypatch).TritonPythonModel()
    backend.initialize({
        "model_config": json.dumps(json_format.MessageToDict(
            config, preserving_proto_field_name=True)),
        "model_repository": str(config_dir), "model_version": str(result["version"])})
    assert backend.session.get_session_options().intra_op_num_threads == threads
