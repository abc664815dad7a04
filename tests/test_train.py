"""The training stage on generated shards: phases, early stopping, resume, pseudo-labels."""

from __future__ import annotations

import json
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


def test_a_fine_tuning_phase_runs_on_while_it_recovers_below_the_heads_best() -> None:
    from cellpipe.engine.fit import RunState, _keep_if_best

    model = torch.nn.Linear(2, 2)
    state = RunState.fresh(model)
    _keep_if_best(state, model, 0.9, np.zeros(1))  # the head phase's best
    kept = {name: value.clone() for name, value in state.best_state.items()}
    state.phase_best, state.stale = -1.0, 0  # what fit does when the next phase starts
    with torch.no_grad():
        model.weight.add_(1.0)
    stale = []
    for score in (0.6, 0.7, 0.8, 0.75, 0.95):  # the dip at the start of fine-tuning
        _keep_if_best(state, model, score, np.zeros(1))
        stale.append(state.stale)
        if score < 0.9:  # below the head's best: its weights stay the ones kept
            assert all(torch.equal(kept[name], value)
                       for name, value in state.best_state.items())
    # Early stopping counts from the phase's own best: rising 0.6 -> 0.8 is progress.
    assert stale == [0, 0, 0, 1, 0]
    assert state.best_score == 0.95 and torch.equal(state.best_state["weight"], model.weight)


def test_discriminative_rates_put_the_backbone_below_the_head() -> None:
    from cellpipe.engine.fit import PhaseParams, _param_groups, _set_trainable
    from cellpipe.nets.classifier import Classifier

    model = Classifier(train_stage.build_backbone("smallcnn", "none"), len(CLASSES), 0.0)
    phase = PhaseParams(trainable=2, epochs=1, lr=1e-3, backbone_lr_scale=0.1)
    _set_trainable(model, phase)
    optimizer = torch.optim.AdamW(_param_groups(model, model, phase), lr=phase.lr)
    head, blocks = optimizer.param_groups
    assert head["lr"] == 1e-3 and blocks["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    tuned = [p for block in model.blocks[-2:] for p in block.parameters()]
    assert {id(p) for p in blocks["params"]} == {id(p) for p in tuned}
    # At the default scale of 1, one group as before (the demo's recipe trains unchanged).
    assert len(_param_groups(model, model, PhaseParams(trainable=2, epochs=1, lr=1e-3))) == 1


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
        "early_stopping_patience": 10,  # every epoch runs: the history below counts them
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


# --- a stopped run still yields a model ----------------------------------------------------


def _stop_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, stop: BaseException) -> None:
    """Make the ``epoch``-th training epoch raise ``stop``, as a signal would."""
    from cellpipe.engine.loop import Objective

    calls = {"epochs": 0}
    original = Objective.train_epoch

    def stopping(self, current):
        calls["epochs"] += 1
        if calls["epochs"] == epoch:
            raise stop
        return original(self, current)

    monkeypatch.setattr(Objective, "train_epoch", stopping)


def test_export_best_saves_a_killed_runs_best_weights_marked_partial(
        shards: Path, manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cellpipe.engine.checkpoint import load_checkpoint
    from cellpipe.stages import export as export_stage

    out = tmp_path / "out"
    params = _params(phases=[{"trainable": "head", "epochs": 2, "lr": 0.01},
                             {"trainable": "all", "epochs": 3, "lr": 0.01}])
    with monkeypatch.context() as patch:
        _stop_in_epoch(patch, 4, KeyboardInterrupt("killed"))  # a kill: nothing saved
        with pytest.raises(KeyboardInterrupt):
            _run(shards, manifest, out, params)
    assert not (out / "model.pt").exists()

    metrics = train_stage.run(shards, manifest, out, out / "model.pt", params, device="cpu",
                              export_best=True)
    saved = load_checkpoint(out / "checkpoints" / "round0.pt")
    partial = {"reason": "exported with --export-best", "round": "round0", "epochs_done": 3,
               "phases_done": 1, "phases": 2}
    trained = load_model(out / "model.pt")
    assert trained.info["partial"] == metrics["partial"] == partial
    assert trained.info["val_macro_f1"] == saved["best_score"]
    for key, weights in trained.classifier.state_dict().items():
        assert torch.equal(weights, saved["best_state"][key]), key
    assert len(pd.read_csv(out / "history.csv")) == 3
    card = export_stage.run(out / "model.pt", tmp_path / "none.json", shards, tmp_path / "export",
                            export_stage.ExportParams(fold_temperature=False))
    assert card is not None
    exported = json.loads((tmp_path / "export" / "card.json").read_text())
    assert exported["partial"] == partial

    finished = _run(shards, manifest, out, params)  # the same command resumes the run
    assert finished["epochs"] == 5 and "partial" not in finished
    assert "partial" not in load_model(out / "model.pt").info


def test_export_best_refuses_checkpoints_of_another_run(shards: Path, manifest: Path,
                                                       tmp_path: Path) -> None:
    from cellpipe.errors import InputError

    out = tmp_path / "out"
    _run(shards, manifest, out, _params())
    other = _params(phases=[{"trainable": "all", "epochs": 3, "lr": 0.02}])
    with pytest.raises(InputError, match="no finished epoch of this run in"):
        train_stage.run(shards, manifest, out, out / "model.pt", other, device="cpu",
                        export_best=True)


def test_a_signal_in_process_saves_the_best_so_far_and_stops(
        shards: Path, manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from cellpipe.errors import Interrupted

    out = tmp_path / "out"
    _stop_in_epoch(monkeypatch, 3, Interrupted(signal.SIGINT))
    with caplog.at_level("INFO"), pytest.raises(Interrupted):
        _run(shards, manifest, out, _params())
    assert load_model(out / "model.pt").info["partial"]["reason"] == "stopped by SIGINT"
    assert "stopped by SIGINT: the best weights so far are saved in" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back


@pytest.mark.slow  # a fresh interpreter imports torch: ~10 s of the ~15
def test_sigterm_mid_training_saves_a_partial_model_and_exits_non_zero(
        shards: Path, manifest: Path, tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": {
        "backbone": "smallcnn", "weights": "none", "batch_size": 16,
        "early_stopping_patience": 1000,
        "phases": [{"trainable": "all", "epochs": 1000, "lr": 0.01}]}}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cellpipe", "train", "--shards", str(shards),
               "--manifest", str(manifest), "--out", str(out), "--model", str(out / "model.pt"),
               "--params", str(params_file), "--device", "cpu"]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in run.stderr:
        if "phase 1/1 epoch 2:" in line:  # two epochs checkpointed, the third under way
            run.send_signal(signal.SIGTERM)
            break
    rest = run.stderr.read()
    assert run.wait(timeout=60) == 128 + signal.SIGTERM, rest
    partial = load_model(out / "model.pt").info["partial"]
    assert partial["reason"] == "stopped by SIGTERM" and partial["epochs_done"] >= 2
    assert "marked partial" in rest and "ERROR" in rest and "stopped by SIGTERM" in rest


# --- the log says where the best epoch was ------------------------------------------------


def test_best_epoch_is_counted_within_its_phase_and_round() -> None:
    history = pd.DataFrame({"phase": [1, 1, 1, 2, 2, 1, 2, 2],
                            "val_macro_f1": [0.1, 0.5, 0.4, 0.6, 0.7, 0.2, 0.3, 0.7],
                            "round": [None] * 5 + [1] * 3})
    best, epoch_in_phase = train_stage.best_epoch(history)
    assert (best["phase"], epoch_in_phase) == (2, 2)  # the first 0.7: round 0's 5th epoch
    best, epoch_in_phase = train_stage.best_epoch(history.iloc[5:])
    assert (best["phase"], epoch_in_phase) == (2, 2)


def test_the_log_names_the_phase_and_epoch_of_the_best(
        shards: Path, manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = _params(phases=[{"trainable": "head", "epochs": 2, "lr": 1e-7},
                             {"trainable": "all", "epochs": 2, "lr": 0.01}])
    with caplog.at_level("INFO"):
        _run(shards, manifest, tmp_path / "out", params)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    best = history.loc[history["val_macro_f1"].idxmax()]
    within = int(best["epoch"]) - (2 if best["phase"] == 2 else 0)
    assert (f"best val macro-F1 {best['val_macro_f1']:.4f} in phase {best['phase']} "
            f"epoch {within} (4 epochs in all, ") in caplog.text
