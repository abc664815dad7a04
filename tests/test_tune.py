"""`cellpipe tune`: a recipe search on the ingested train and val images, never on test."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from cellpipe.cli import main
from cellpipe.data.manifest import read_manifest
from cellpipe.stages import ingest as ingest_stage
from cellpipe.stages import train as train_stage
from cellpipe.stages.train import TrainParams
from cellpipe.tuning import space as space_module
from cellpipe.tuning.params_file import write_params
from cellpipe.tuning.space import SearchSpace, native_size, overrides, scaled_augment
from conftest import CLASS_COLOURS, REPO, save, unique_image

IMAGES_PER_CLASS = 16


@dataclass(frozen=True)
class Ingested:
    source: Path
    manifest: Path
    test_files: list[Path]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    """Class folders of 28x24 px crops, ingested; the test split's files are then deleted,
    so a search that read them would fail or reject them."""
    work = tmp_path_factory.mktemp("tune")
    source = work / "cells"
    for name, colour in CLASS_COLOURS.items():
        for index in range(IMAGES_PER_CLASS):
            seed = 1000 * len(name) + 100 * ord(name) + index
            save(source / name / f"{index}.png", unique_image(seed, colour, size=(28, 24)))
    ingest_stage.run(source, work / "ingest", ingest_stage.IngestParams.model_validate({
        "classes": list(CLASS_COLOURS), "split": {"val_fraction": 0.25, "test_fraction": 0.25}}),
        workers=1)
    manifest = work / "ingest" / "manifest.parquet"
    rows = read_manifest(manifest).rows
    test_files = [source / path for path in rows.loc[rows["split"] == "test", "path"]]
    assert test_files
    for path in test_files:
        path.unlink()
    return Ingested(source, manifest, test_files)


def _tune(ingested: Ingested, out: Path, params: Path, *options: str) -> int:
    return main(["tune", "--manifest", str(ingested.manifest), "--source", str(ingested.source),
                 "--out", str(out), "--params", str(params), "--epochs", "1", "--seed", "3",
                 "--workers", "1", "--device", "cpu", *options])


@pytest.fixture(scope="module")
def searched(ingested: Ingested, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path, int, list[str]]:
    """Two trials, the first one's recipe raising; params.yaml a copy of the project's.
    Returns the output folder, the params copy, the exit status and the splits read."""
    work = tmp_path_factory.mktemp("search")
    params = work / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    read: list[str] = []
    real_open_split, real_train = train_stage.open_split, train_stage.train
    calls = {"train": 0}

    def open_split(shards: Path, split: str, **options):
        read.append(split)
        return real_open_split(shards, split, **options)

    def train(*args, **options):
        calls["train"] += 1
        if calls["train"] == 1:
            raise RuntimeError("a recipe that breaks")
        return real_train(*args, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_stage, "open_split", open_split)
        patch.setattr(train_stage, "train", train)
        status = _tune(ingested, work / "tune", params, "--budget", "10", "--trials", "2")
    return work / "tune", params, status, read


def test_a_search_records_every_trial_and_writes_the_choice_back(
        searched: tuple[Path, Path, int, list[str]]) -> None:
    out, params, status, _ = searched
    assert status == 0
    trials = pd.read_csv(out / "trials.csv")
    assert trials["number"].tolist() == [0, 1]
    assert trials["state"].tolist() == ["FAIL", "COMPLETE"]
    # The cheapest recipe comes first, so a tight budget still gets one trial done.
    first = trials.loc[0]
    assert (first["params_model"], first["params_training"]) == ("whole", "head")
    assert first["params_image_size"] == trials["params_image_size"].min()
    assert trials.loc[0, "user_attrs_fail_reason"] == "RuntimeError: a recipe that breaks"
    assert 0 <= trials.loc[1, "value"] <= 1
    assert (out / "trials.png").stat().st_size > 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["trial"] == 1 and best["val_macro_f1"] == pytest.approx(trials.loc[1, "value"])
    chosen = best["params"]
    written = yaml.safe_load(params.read_text())
    original = yaml.safe_load((REPO / "params.yaml").read_text())
    assert written["preprocess"]["image_size"] == chosen["preprocess"]["image_size"]
    for key, value in chosen["train"].items():
        assert written["train"][key] == value, key
    # Only the chosen keys changed: every other section and key is as it was.
    for section in original:
        keep = set(chosen.get(section, {}))
        assert ({k: v for k, v in written[section].items() if k not in keep}
                == {k: v for k, v in original[section].items() if k not in keep}), section
    # Comments kept: every comment line of the original is still there.
    comments = [line.strip() for line in (REPO / "params.yaml").read_text().splitlines()
                if line.strip().startswith("#")]
    assert set(comments) <= {line.strip() for line in params.read_text().splitlines()}


def test_the_search_never_reads_the_test_split(searched: tuple[Path, Path, int, list[str]],
                                               ingested: Ingested) -> None:
    out, _, _, read = searched
    assert read and "test" not in read  # the train stage opened train and val only
    assert not any(path.exists() for path in ingested.test_files)  # deleted, and not needed
    for shards in (out / "shards").iterdir():
        assert sorted(p.name for p in shards.iterdir() if p.is_dir()) == ["train", "val"]
        assert "test" not in yaml.safe_load((shards / "meta.json").read_text())["counts"]


def test_a_rerun_resumes_the_study(searched: tuple[Path, Path, int, list[str]],
                                   ingested: Ingested, tmp_path: Path) -> None:
    out, params, _, _ = searched
    again = tmp_path / "tune"
    shutil.copytree(out, again)
    assert _tune(ingested, again, params, "--budget", "10", "--trials", "1",
                 "--no-write-params") == 0
    trials = pd.read_csv(again / "trials.csv")
    assert trials["state"].tolist()[:2] == ["FAIL", "COMPLETE"]
    # One more recipe searched (trial 2); then, on a set this small, the two recipes are
    # finalists: each is scored again on new folds, as a trial of its own, best first.
    searched_trials = trials[trials["user_attrs_rescore_of"].isna()]
    assert searched_trials["number"].tolist() == [0, 1, 2]
    assert searched_trials.loc[[1, 2], "user_attrs_recipe"].nunique() == 2
    rescores = trials[trials["user_attrs_rescore_of"].notna()]
    finalists = searched_trials.loc[[1, 2]].sort_values("value", ascending=False)
    assert rescores["user_attrs_rescore_of"].astype(int).tolist() == finalists["number"].tolist()
    assert (rescores["state"] == "COMPLETE").all()
    for recipe in rescores["user_attrs_recipe"]:
        assert sorted(p.name for p in (again / "rescores" / recipe).iterdir()) == [
            "fold1", "fold2", "fold3"]
    # The choice: the best mean of first and new folds.
    first_scores = trials.set_index("number")["value"]
    means = {int(row.user_attrs_rescore_of):
             (row.value + first_scores[int(row.user_attrs_rescore_of)]) / 2
             for row in rescores.itertuples()}
    best = yaml.safe_load((again / "best.yaml").read_text())
    assert best["trial"] == max(means, key=means.get)
    assert best["val_macro_f1"] == pytest.approx(max(means.values()), abs=1e-6)


def test_the_choice_is_among_the_finalists_scored_again() -> None:
    from optuna.distributions import CategoricalDistribution

    from cellpipe.tuning.search import best_recipe

    study = optuna.create_study(direction="maximize")
    size = {"image_size": CategoricalDistribution([64])}

    def add(value: float, **attrs) -> None:
        study.add_trial(optuna.trial.create_trial(params={"image_size": 64}, distributions=size,
                                                  value=value, user_attrs=attrs))

    add(0.90, recipe="lucky")  # trial 0: the best first score
    add(0.85, recipe="steady")  # 1
    add(0.84, recipe="not a finalist")  # 2
    assert best_recipe(study)[0].number == 0  # nothing scored again: the best first score
    add(0.70, recipe="lucky", rescore_of=0)  # its new folds fall worse: mean 0.80
    add(0.83, recipe="steady", rescore_of=1)  # mean 0.84
    best, score = best_recipe(study)
    # Among the finalists scored again, though trial 2's first score (0.84) is as high.
    assert best.number == 1 and score == pytest.approx(0.84)


def test_a_trial_stopped_by_the_budget_counts_with_what_it_finished(
        ingested: Ingested, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    real_train = train_stage.train
    folds_started = []

    def first_fold_only(*args, **options):
        folds_started.append(options["checkpoints"])
        if len(folds_started) == 1:
            return real_train(*args, **options)
        time.sleep(120)  # the second fold outlasts the budget

    monkeypatch.setattr(train_stage, "train", first_fold_only)
    assert _tune(ingested, tmp_path / "tune", params, "--budget", "0.4") == 0
    assert len(folds_started) == 2  # small set: folds; the budget ended in the second
    assert folds_started[0].parent.name == "fold1"
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv")
    assert trials["state"].tolist() == ["COMPLETE"]  # the first fold's best epoch scores it
    assert 0 <= trials.loc[0, "value"] <= 1
    assert "in fold 2 of 3" in trials.loc[0, "user_attrs_partial"]
    assert pd.isna(trials.loc[0].get("user_attrs_train_seconds"))  # not a full recipe's cost
    assert yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())["trial"] == 0


def test_small_sets_are_scored_by_cross_validation_folds(ingested: Ingested) -> None:
    from cellpipe.tuning.search import _without_test, trial_manifests

    listed = _without_test(read_manifest(ingested.manifest), "supervised")
    folds = trial_manifests(listed, seed=3)
    assert len(folds) == 3
    pool = listed.rows.index[listed.rows["split"].isin(["train", "val"])]
    vals = [set(fold.rows.index[fold.rows["split"] == "val"]) for fold in folds]
    assert set().union(*vals) == set(pool) and sum(map(len, vals)) == len(pool)  # each once
    for fold in folds:
        assert set(fold.rows["split"]) == {"train", "val"}
        for split in ("train", "val"):  # every class in each fold's train and val
            assert set(fold.rows.loc[fold.rows["split"] == split, "label"]) == set(CLASS_COLOURS)
        assert fold.rows["path"].tolist() == listed.rows["path"].tolist()


def test_a_class_in_fewer_groups_than_folds_keeps_the_given_split(ingested: Ingested) -> None:
    from cellpipe.tuning.search import _without_test, trial_manifests

    listed = _without_test(read_manifest(ingested.manifest), "supervised")
    rows = listed.rows.copy()
    rows.loc[rows["label"] == "a", "source_id"] = "slide1"  # all of class a from one slide
    rows.loc[rows.index[rows["label"] == "a"][:2], "source_id"] = "slide2"
    [kept] = trial_manifests(type(listed)(rows, listed.classes), seed=3)
    assert kept.rows["split"].tolist() == rows["split"].tolist()


def test_large_sets_are_searched_on_a_stratified_sample_of_train() -> None:
    from cellpipe.data.manifest import Manifest, empty_rows
    from cellpipe.tuning import search

    counts = {"common": 6_000, "rare": 300, "tiny": 4}
    labels = [name for name, count in counts.items() for _ in range(count)]
    rows = pd.concat([empty_rows(), pd.DataFrame({
        "path": [f"{i}.png" for i in range(len(labels) + 500)],
        "label": labels + ["common"] * 500,
        "split": ["train"] * len(labels) + ["val"] * 500,
        "source_id": [str(i) for i in range(len(labels) + 500)]})])
    listed = Manifest(rows.reset_index(drop=True), tuple(counts))
    [sampled] = search.trial_manifests(listed, seed=0)
    kept = sampled.rows[sampled.rows["split"] == "train"]["label"].value_counts()
    assert abs(kept.sum() - search.SEARCH_TRAIN_IMAGES) <= search.SAMPLE_MIN_PER_CLASS
    assert kept["tiny"] == 4 and kept["rare"] == 95  # in proportion (300 x 2000/6304)
    assert (sampled.rows["split"] == "val").sum() == 500  # val whole
    again = search.trial_manifests(listed, seed=0)[0]
    assert again.rows["path"].tolist() == sampled.rows["path"].tolist()  # seeded


def test_a_trial_still_training_at_the_end_of_the_budget_is_stopped(
        ingested: Ingested, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    monkeypatch.setattr(train_stage, "train", lambda *args, **options: time.sleep(120))
    # 6 s: the first trial starts, and the deadline stops its (endless) training; nothing
    # finished, so nothing is chosen and params.yaml is left alone.
    started = time.monotonic()
    assert _tune(ingested, tmp_path / "tune", params, "--budget", "0.1") == 1
    assert time.monotonic() - started < 30
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv")
    assert trials["state"].tolist() == ["PRUNED"]
    assert "end of the budget" in trials.loc[0, "user_attrs_stop_reason"]
    assert "no trial of the search finished" in caplog.text
    assert params.read_text() == (REPO / "params.yaml").read_text()


def test_ctrl_c_stops_the_search_and_leaves_params_alone(ingested: Ingested, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)

    def interrupted(*args, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_stage, "train", interrupted)
    assert _tune(ingested, tmp_path / "tune", params, "--budget", "10") == 130
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'tune/study.db'}")
    assert [trial.state.name for trial in study.trials] == ["FAIL"]
    assert study.trials[0].user_attrs["fail_reason"] == "stopped by the user"
    assert params.read_text() == (REPO / "params.yaml").read_text()


# --- the search space and the params file, without training ---------------------------------


def _space(**changes) -> SearchSpace:
    base = {"sizes": (32, 64), "backbone": "efficientnet_lite0", "weights": "imagenet",
            "blocks": 9, "augment": TrainParams.model_fields["augment"].default.model_dump(),
            "epochs": 4, "cached_head": True}
    return SearchSpace(**{**base, **changes})


def test_the_native_size_is_the_median_longer_side_rounded_and_capped(ingested: Ingested
                                                                        ) -> None:
    listed = read_manifest(ingested.manifest)
    assert native_size(listed) == 32  # 28 px crops, to a multiple of 8 (28 -> 32 is nearer)
    rows = listed.rows.assign(width=900, height=700)
    assert native_size(type(listed)(rows, listed.classes)) == space_module.NATIVE_SIZE_CAP


def test_epochs_per_unit_follow_the_train_set_size() -> None:
    # A unit is about the same number of images seen: tiny sets get the most epochs.
    assert space_module.epochs_for(160) == space_module.DEFAULT_EPOCHS
    assert space_module.epochs_for(15_434) == 4  # malaria: as its hand-tuned recipe
    assert space_module.epochs_for(1_000_000) == space_module.MIN_EPOCHS
    assert space_module.epochs_for(0) == space_module.DEFAULT_EPOCHS


def test_only_inputs_far_from_square_ask_how_to_fit_the_square(ingested: Ingested) -> None:
    listed = read_manifest(ingested.manifest)
    assert space_module.resize_modes(listed, "pad") == ("pad",)  # 28x28 crops
    wide = type(listed)(listed.rows.assign(width=320, height=240), listed.classes)
    assert space_module.median_aspect(wide) == pytest.approx(4 / 3)
    assert space_module.resize_modes(wide, "crop") == ("crop", "pad")  # params.yaml's first
    space = _space(resizes=("pad", "crop"))
    assert SearchSpace.from_dict(space.to_dict()) == space
    stored = {key: value for key, value in space.to_dict().items() if key != "resizes"}
    assert SearchSpace.from_dict(stored).resizes == ("pad",)  # a study from before the choice
    cropped = {"image_size": 64, "resize": "crop", "model": "whole", "training": "head"}
    assert overrides(space, cropped)["preprocess"] == {"image_size": 64, "resize": "crop"}
    assert space_module.recipe_name(cropped) == "64px-crop-whole-head-none"
    from cellpipe.tuning.search import cheapest_recipe
    assert cheapest_recipe(space)["resize"] == "pad" and "resize" not in cheapest_recipe(_space())


def test_recipes_become_params_yaml_values() -> None:
    space = _space()
    whole = overrides(space, {"image_size": 64, "model": "whole", "training": "finetune_last",
                              "augment": "base"})["train"]
    assert (whole["backbone"], whole["weights"], whole["backbone_blocks"]) == (
        "efficientnet_lite0", "imagenet", None)
    assert whole["phases"] == [{"trainable": "head", "epochs": 8, "lr": 3e-3},
                               {"trainable": 3, "epochs": 4, "lr": 1e-3,
                                "backbone_lr_scale": 0.3}]
    truncated = overrides(space, {"image_size": 32, "model": "truncated",
                                  "training": "finetune_all", "augment": "stronger"})
    assert truncated["preprocess"] == {"image_size": 32}
    assert truncated["train"]["backbone_blocks"] == 5
    assert truncated["train"]["phases"][1] == {"trainable": "all", "epochs": 4, "lr": 1e-3,
                                               "backbone_lr_scale": 0.1}
    scratch = overrides(space, {"image_size": 32, "model": "scratch", "augment": "weaker"})
    assert (scratch["train"]["backbone"], scratch["train"]["weights"]) == ("smallcnn", "none")
    assert scratch["train"]["phases"] == [{"trainable": "all", "epochs": 12, "lr": 3e-3}]
    assert scratch["train"]["early_stopping_patience"] == 4  # a third of its epochs
    assert "early_stopping_patience" not in whole  # params.yaml's, for pretrained recipes
    for values in (whole, truncated["train"], scratch["train"]):  # each one a valid recipe
        TrainParams.model_validate({**values, "phases": values["phases"]})


def test_augmentation_scales_within_bounds_and_only_where_images_are_seen() -> None:
    base = _space().augment
    stronger = scaled_augment({**base, "hue": 0.4}, space_module.AUGMENT_SCALES["stronger"])
    assert stronger["affine_degrees"] == 2 * base["affine_degrees"] and stronger["hue"] == 0.5
    assert scaled_augment(base, 0.5)["flips"] is True
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        choices = space_module.suggest(trial, _space())
        head_only = choices.get("training") == "head"
        assert ("augment" in choices) != head_only  # a cached-feature head sees no image
        study.tell(trial, 0.5)


def test_the_space_is_small_and_suggest_draws_only_from_it() -> None:
    space = _space()
    names = [space_module.recipe_name(choices) for choices in space_module.all_recipes(space)]
    # 2 sizes x (2 pretrained models x (head + 2 fine-tunings x 3 augmentations) + 3 scratch)
    assert len(names) == len(set(names)) == 2 * (2 * (1 + 2 * 3) + 3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(40):
        trial = study.ask()
        assert space_module.recipe_name(space_module.suggest(trial, space)) in names
        study.tell(trial, 0.5)
    fitted = _space(resizes=("pad", "crop"))  # inputs far from square: every recipe twice
    fitted_names = {space_module.recipe_name(c) for c in space_module.all_recipes(fitted)}
    assert len(fitted_names) == 2 * len(names)
    for _ in range(20):
        trial = study.ask()
        assert space_module.recipe_name(space_module.suggest(trial, fitted)) in fitted_names
        study.tell(trial, 0.5)


def test_a_recipe_drawn_again_gets_its_score_without_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cellpipe.tuning.search import Budget, _Objective

    monkeypatch.setattr(train_stage, "train", lambda *args, **options: pytest.fail("trained"))
    space = _space()

    def trained(trial: optuna.Trial) -> float:
        trial.set_user_attr("recipe", space_module.recipe_name(space_module.suggest(trial, space)))
        return 0.75

    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        study.enqueue_trial({"image_size": 64, "model": "whole", "training": "head"})
    study.optimize(trained, n_trials=1)
    study.optimize(_Objective(None, [], space, tmp_path, Budget(1), "cpu", 1), n_trials=1)
    assert study.trials[1].value == 0.75 and study.trials[1].user_attrs["repeat_of"] == 0


def test_writing_params_changes_only_what_differs_and_keeps_the_layout(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    params.write_text(original)
    augment = yaml.safe_load(original)["train"]["augment"]
    assert write_params(params, {"train": {"augment": augment}}) == []  # nothing differs
    assert params.read_text() == original
    changes = write_params(params, {"preprocess": {"image_size": 80}, "train": {
        "backbone_blocks": 5, "augment": {**augment, "hue": 0.06},
        "phases": [{"trainable": "head", "epochs": 30, "lr": 0.003}]}})
    assert [change.key for change in changes] == [
        "preprocess.image_size", "train.backbone_blocks", "train.augment.hue", "train.phases"]
    text = params.read_text()
    assert "  image_size: 80             # px, square model input\n" in text
    assert "  backbone_blocks: 5         # keep only the first N blocks" in text
    assert "    - {trainable: head, epochs: 30, lr: 0.003}  # chosen by cellpipe tune\n" in text
    assert "  mean: null " in text  # nulls stay nulls
    changed = {line for line in text.splitlines()} ^ {line for line in original.splitlines()}
    assert len(changed) == 2 * 3 + 2 + 1  # 3 values replaced, 2 phases out, 1 phase in
