"""The study: each trial preprocesses at its input size and trains with the train stage's
own core function; its score is the run's best val macro-F1. The test split is left out
of everything the search reads.

The study lives in SQLite under the output folder, so a stopped search resumes where it
was (``load_if_exists``). Shards are cached per input size. A recipe drawn again gets its
first score (seeded training would only repeat it), and each recipe trains in a folder of
its own, so one that a stopped search had begun resumes from its checkpoints. The search
ends early once every recipe has a score, or once TPE keeps drawing tried ones.

What a trial trains on depends on the set's size, so that the same budget buys a useful
search on 200 images and on 15,000:

* **Small sets** (fewer than :data:`CROSS_VALIDATE_BELOW` labelled train and val images):
  one val split of a few dozen images lets one lucky epoch decide, so a trial trains
  :data:`FOLDS` times, each fold of the pooled train and val images the val split once
  (stratified, groups kept whole), and scores the mean of the folds' best val macro-F1.
  Even so, the best of a dozen noisy scores is partly the luckiest: in the last
  :data:`FINALIST_SHARE` of the budget the :data:`FINALISTS` best recipes are scored again
  on new folds (another shuffle), and the choice is the best mean over both
  (:func:`rescore_finalists`, :func:`best_recipe`).
* **Large sets**: trials train on a stratified sample of at most
  :data:`SEARCH_TRAIN_IMAGES` train images (val whole): a cheap, lower-fidelity ranking
  of the recipes; the chosen one then trains on all of them (``dvc repro``).

The first trial is the cheapest recipe (:func:`cheapest_recipe`). The budget holds in
three ways: Optuna starts no trial after the timeout; a trial whose
recipe took longer before than the time left is not started (the search stops there);
and a trial still training when the budget ends is stopped and counts with its best
epoch so far (marked ``partial``; pruned if no epoch had ended).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from sklearn.model_selection import StratifiedGroupKFold

from cellpipe.data.manifest import Manifest, read_manifest
from cellpipe.engine.fit import FitResult
from cellpipe.engine.loop import Device
from cellpipe.errors import InputError
from cellpipe.fsutil import file_sha256
from cellpipe.stages import preprocess as preprocess_stage
from cellpipe.stages import train as train_stage
from cellpipe.stages.preprocess import PreprocessParams
from cellpipe.stages.train import TrainParams
from cellpipe.tuning.space import (
    SearchSpace,
    all_recipes,
    apply,
    build_space,
    labelled_train_images,
    overrides,
    recipe_name,
    suggest,
)

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
# Random recipes before TPE models the scores: the space holds about 40 recipes and a CPU
# budget buys 10-20 trials, so Optuna's default of 10 would leave TPE little to choose.
STARTUP_TRIALS = 5
# Trials in a row that draw recipes already tried before the search counts as settled:
# a repeat costs nothing (its score is looked up), so TPE gets room to leave its favourites.
REPEATS_TO_SETTLE = 20
# Splits a search may train on: the labelled ones a stage trains on, never "test".
_TRAINING_SPLITS = ("train", "val")
_SEMI_SUPERVISED = ("pseudo_label", "sgan", "fixmatch")  # methods that read "unlabeled"
# Below this many labelled train + val images a trial is scored by k-fold cross-validation:
# its folds cost little there, and a val split of a few dozen images is too noisy to rank
# recipes (on 200 melanoma images one epoch's val macro-F1 swung from 0.73 to 0.92).
CROSS_VALIDATE_BELOW = 1_000
FOLDS = 3
# The best recipes by cross-validated score, scored again on new folds before the choice,
# and the share of the budget kept for it. On 200 melanoma images the best of 11 recipes
# scored 0.853 (folds 0.81-0.89) where nine others scored 0.75-0.81: selection picks the
# recipe whose folds happened to fall well as much as the better recipe.
FINALISTS = 3
FINALIST_SHARE = 0.25
# Above this many train images a trial trains on a stratified sample of them: on 2 CPU
# cores one fine-tuning epoch of 15,434 malaria images takes ~160 s, of 2,000 ~20 s.
SEARCH_TRAIN_IMAGES = 2_000
# A class keeps at least this many images in the sample (or all it has).
SAMPLE_MIN_PER_CLASS = 10


class OutOfBudget(Exception):
    """The budget ended while a trial was training."""


@dataclass
class Budget:
    """Wall-clock seconds for the whole search, counted from its creation."""

    minutes: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.minutes * 60 - (time.monotonic() - self.started)

    def first(self, fraction: float) -> Budget:
        """The first ``fraction`` of this budget (started at the same time)."""
        return Budget(self.minutes * fraction, self.started)


@dataclass(frozen=True)
class TuneInputs:
    """What every trial starts from: the ingest stage's outputs and the base params."""

    manifest: Path
    source: Path
    preprocess: PreprocessParams
    train: TrainParams


@dataclass(frozen=True)
class SearchResult:
    study: optuna.Study
    space: SearchSpace
    interrupted: bool  # Ctrl-C ended it: the trials before it still count


def tune(inputs: TuneInputs, out: Path, *, budget: Budget, seed: int = 42,
         max_trials: int | None = None, epochs: int | None = None, device: str = "auto",
         workers: int = 1) -> SearchResult:
    """Run (or resume) the search in ``out`` until the budget, ``max_trials`` or Ctrl-C
    ends it."""
    listed = _without_test(read_manifest(inputs.manifest), inputs.train.method)
    out.mkdir(parents=True, exist_ok=True)
    study, space = open_study(out, listed, inputs, seed=seed, epochs=epochs)
    manifests = trial_manifests(listed, seed)
    cross_validated = len(manifests) > 1
    searching = budget.first(1 - FINALIST_SHARE) if cross_validated else budget
    objective = _Objective(inputs, manifests, space, out, searching, device, workers)
    try:
        study.optimize(objective, n_trials=max_trials, timeout=max(searching.left(), 0),
                       catch=(Exception,),  # a failing recipe is recorded; the search goes on
                       callbacks=[_ProgressLog(budget), _stop_when_nothing_fits(searching),
                                  _StopWhenTried(len(all_recipes(space)))])
        if cross_validated:
            new_folds = cross_validation_folds(listed, FOLDS, seed + 1)
            rescore_finalists(study, replace(objective, manifests=new_folds, budget=budget,
                                             runs="rescores"))
    except KeyboardInterrupt:  # Optuna has recorded the trial in progress as failed
        return SearchResult(study, space, interrupted=True)
    return SearchResult(study, space, interrupted=False)


def open_study(out: Path, listed: Manifest, inputs: TuneInputs, *, seed: int,
               epochs: int | None) -> tuple[optuna.Study, SearchSpace]:
    """The study of this data set in ``out``'s SQLite file, created or resumed, and the
    search space it was created with."""
    # One study per manifest: a new ingest is another data set, whose scores don't compare.
    name = f"tune-{file_sha256(inputs.manifest)[:12]}"
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / STUDY_FILE).resolve()}")
    existing = {summary.study_name: summary.n_trials
                for summary in optuna.get_all_study_summaries(storage)}
    # Seeded by how far the study got: a resumed search must not replay the random draws
    # of its first trials, and the same history still gives the same next recipes.
    sampler = optuna.samplers.TPESampler(seed=seed + existing.get(name, 0),
                                         n_startup_trials=STARTUP_TRIALS)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                direction="maximize", load_if_exists=True)
    stored = study.user_attrs.get("space")
    if stored is None:
        space = build_space(listed, inputs.train, epochs, inputs.preprocess.resize)
        study.set_user_attr("space", space.to_dict())
        study.enqueue_trial(cheapest_recipe(space))
        log.info("new study %s in %s: input sizes %s (fit to the square: %s), %s (%d blocks; "
                 "truncated: first %d), small CNN from scratch; epochs per unit: %d", name,
                 out / STUDY_FILE, list(space.sizes), " or ".join(space.resizes),
                 space.backbone, space.blocks, space.truncated_blocks, space.epochs)
    else:
        space = SearchSpace.from_dict(stored)
        if epochs is not None and epochs != space.epochs:
            raise InputError(f"the study in {out} trains {space.epochs} epochs per unit, not "
                             f"{epochs}: drop --epochs to resume it, or use another --out")
        log.info("resuming study %s: %d trials so far (its search space is its first run's)",
                 name, len(study.trials))
    _fail_abandoned(study)
    return study, space


def cheapest_recipe(space: SearchSpace) -> dict[str, object]:
    """The first trial of every search: a head on the whole pretrained backbone at the
    smallest input size, which trains on cached features in seconds to minutes whatever
    the data set, so that a budget no fine-tuning fits in (one fine-tuning epoch of a
    15,000-image set takes minutes on 2 cores) still chooses a recipe; params.yaml's resize."""
    fit = {"resize": space.resizes[0]} if len(space.resizes) > 1 else {}
    return {"image_size": min(space.sizes), **fit, "model": "whole", "training": "head"}


def _fail_abandoned(study: optuna.Study) -> None:
    """Trials still marked running belong to a search that was killed (one search runs
    in a folder at a time): record them as failed, so the table says what happened."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("trial %d was left running by a killed search: recorded as failed",
                    trial.number)


def _without_test(manifest: Manifest, method: str) -> Manifest:
    """The manifest's rows a search may read: train and val (and unlabelled images for the
    semi-supervised methods), never the test split, whose score must stay unbiased."""
    keep = [*_TRAINING_SPLITS, *(["unlabeled"] if method in _SEMI_SUPERVISED else [])]
    rows = manifest.rows[manifest.rows["split"].isin(keep)].reset_index(drop=True)
    return replace(manifest, rows=rows)


def trial_manifests(listed: Manifest, seed: int) -> list[Manifest]:
    """What each trial trains on: :data:`FOLDS` cross-validation folds of a small set, or
    one manifest (the train split sampled down for a large set)."""
    labelled = listed.rows["label"].notna() & listed.rows["split"].isin(_TRAINING_SPLITS)
    if labelled.sum() < CROSS_VALIDATE_BELOW:
        folds = cross_validation_folds(listed, FOLDS, seed)
        if len(folds) > 1:
            log.info("%d labelled train and val images: each trial is scored by %d-fold "
                     "cross-validation over them", labelled.sum(), len(folds))
            return folds
    sampled = sample_train(listed, SEARCH_TRAIN_IMAGES, seed)
    if len(sampled.rows) < len(listed.rows):
        log.info("trials train on a stratified sample of %d of the %d train images (val "
                 "whole); the chosen recipe trains on all of them",
                 labelled_train_images(sampled), labelled_train_images(listed))
    return [sampled]


def cross_validation_folds(listed: Manifest, folds: int, seed: int) -> list[Manifest]:
    """``folds`` manifests whose labelled train and val images are re-split: each fold's
    val is one part of them (stratified by class, a group never split), the rest train;
    unlabelled rows as they were. One manifest (as given) when a class has too few images."""
    rows = listed.rows
    pool = rows.index[rows["label"].notna() & rows["split"].isin(_TRAINING_SPLITS)]
    labels = rows.loc[pool, "label"].to_numpy()
    if rows.loc[pool].groupby("label")["source_id"].nunique().min() < folds:
        return [listed]  # a class could not be in every fold's val (groups stay whole)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    manifests = []
    for _, val in splitter.split(pool, labels, groups=rows.loc[pool, "source_id"].to_numpy()):
        fold = rows.copy()
        fold.loc[pool, "split"] = "train"
        fold.loc[pool[val], "split"] = "val"
        manifests.append(replace(listed, rows=fold))
    return manifests


def sample_train(listed: Manifest, cap: int, seed: int) -> Manifest:
    """``listed`` with its labelled train split sampled down to about ``cap`` images, each
    class in proportion but keeping at least :data:`SAMPLE_MIN_PER_CLASS` (or all it has)."""
    rows = listed.rows
    train = rows[rows["split"].eq("train") & rows["label"].notna()]
    if len(train) <= cap:
        return listed
    fraction = cap / len(train)
    kept = [group.sample(n=min(len(group), max(SAMPLE_MIN_PER_CLASS,
                                                round(fraction * len(group)))),
                         random_state=seed).index
            for _, group in train.groupby("label", sort=True)]
    dropped = train.index.difference(pd.Index([]).append(kept))
    return replace(listed, rows=rows.drop(index=dropped).reset_index(drop=True))


@dataclass
class _Objective:
    """One trial: draw a recipe, preprocess at its size (once per size and fold), train it
    on each of ``manifests`` (the folds, or the one sampled set) and score the mean."""

    inputs: TuneInputs
    manifests: list[Manifest]
    space: SearchSpace
    out: Path
    budget: Budget
    device: str
    workers: int
    runs: str = "trials"  # the folder of the trials' training runs, under ``out``

    def __call__(self, trial: optuna.Trial) -> float:
        choices = suggest(trial, self.space)
        name = recipe_name(choices)
        trial.set_user_attr("recipe", name)
        rescore = "rescore_of" in trial.user_attrs
        earlier = None if rescore else finished_trials(trial.study).get(name)
        if earlier is not None:
            # Seeded training on the same data gives the same score again: tell TPE that
            # score instead of training it again (and of telling it nothing).
            trial.set_user_attr("repeat_of", earlier.number)
            return float(earlier.value)
        try:
            score = self._train(trial, choices, name)
            if rescore and "partial" in trial.user_attrs:  # not as many folds as the first
                raise optuna.TrialPruned(trial.user_attrs["partial"])
            return score
        except OutOfBudget as stop:
            reason = f"stopped at the end of the budget ({stop}) before its first epoch ended"
            trial.set_user_attr("stop_reason", reason)
            trial.study.stop()
            raise optuna.TrialPruned(reason) from stop
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "stopped by the user")
            raise
        except Exception as error:  # recorded with the trial; Optuna logs the traceback
            trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}")
            raise

    def _train(self, trial: optuna.Trial, choices: dict, name: str) -> float:
        expected = recipe_costs(trial.study).get(name)
        if expected is not None and expected > self.budget.left():
            reason = (f"{name} took {_duration(expected)} before, "
                      f"{_duration(self.budget.left())} are left")
            trial.set_user_attr("stop_reason", reason)
            trial.study.stop()
            raise optuna.TrialPruned(f"not started: {reason}")
        values = overrides(self.space, choices)
        preprocess = apply(self.inputs.preprocess, values["preprocess"])
        params = apply(self.inputs.train, values["train"])
        started = time.monotonic()
        results: list[FitResult] = []
        for index, manifest in enumerate(self.manifests):
            shards = self._shards(preprocess, manifest)
            folder = self.out / self.runs / name
            if len(self.manifests) > 1:
                folder = folder / f"fold{index + 1}"
            checkpoints = folder / "checkpoints"
            fingerprint = train_stage.fingerprint_of(params, self.inputs.manifest, shards)
            try:
                with deadline(self.budget.left()):
                    outcome = train_stage.train(shards, params, device=Device.pick(self.device),
                                                checkpoints=checkpoints,
                                                fingerprint=fingerprint)
            except OutOfBudget as stop:
                # The best epoch so far still ranks the recipe (a lower bound on its score).
                outcome = train_stage.best_so_far(shards, params, checkpoints=checkpoints,
                                                  fingerprint=fingerprint, reason=str(stop))
                if outcome is not None:
                    results.append(outcome.result)
                if not results:
                    raise
                where = (f" in fold {index + 1} of {len(self.manifests)}"
                         if len(self.manifests) > 1 else "")
                trial.set_user_attr("partial", f"stopped at the end of the budget ({stop}){where}")
                trial.study.stop()
                break
            results.append(outcome.result)
        else:
            # Only a recipe trained to its end tells what it costs.
            trial.set_user_attr("train_seconds", round(time.monotonic() - started, 1))
        return _record_folds(trial, results)

    def _shards(self, params: PreprocessParams, manifest: Manifest) -> Path:
        """The train and val shards of ``manifest`` at ``params.image_size``, preprocessed on
        first use."""
        key = hashlib.sha256(json.dumps([file_sha256(self.inputs.manifest),
                                         params.model_dump(),
                                         manifest.rows["split"].tolist(),
                                         manifest.rows["path"].tolist()]).encode())
        folder = self.out / "shards" / f"{params.image_size}px-{key.hexdigest()[:10]}"
        if not (folder / "meta.json").is_file():
            log.info("preprocessing the train and val images at %d px into %s",
                     params.image_size, folder)
            _, rejected = preprocess_stage.preprocess(manifest, self.inputs.source, folder,
                                                      params, workers=self.workers)
            if rejected:
                log.warning("%d images failed to decode at %d px (first: %s: %s)",
                            len(rejected), params.image_size, rejected[0].path,
                            rejected[0].reason)
        return folder


def _record_folds(trial: optuna.Trial, results: list[FitResult]) -> float:
    """Store what each fold's run did with the trial; return the mean best val macro-F1."""
    bests = [max(result.history, key=lambda record: record["val_macro_f1"])
             for result in results if result.history]
    scores = [float(result.best_score) for result in results]
    trial.set_user_attr("epochs_run", sum(len(result.history) for result in results))
    trial.set_user_attr("best_phase", ",".join(str(best.get("phase")) for best in bests))
    trial.set_user_attr("val_accuracy", round(sum(best["val_accuracy"] for best in bests)
                                              / max(len(bests), 1), 6))
    if len(results) > 1:
        trial.set_user_attr("fold_scores", ",".join(f"{score:.4f}" for score in scores))
    return sum(scores) / len(scores)


def rescore_finalists(study: optuna.Study, objective: _Objective) -> None:
    """Score the :data:`FINALISTS` best recipes again, each as a trial of its own (marked
    ``rescore_of``) trained on ``objective``'s new folds, best first, until the budget ends;
    a recipe scored again before (a resumed search) is not trained again."""
    firsts = sorted(finished_trials(study).values(), key=lambda trial: -trial.value)
    finalists = firsts[:FINALISTS]
    done = {trial.user_attrs["rescore_of"] for trial in _rescores(study)}
    if len(finalists) < 2:
        return  # nothing to choose between
    log.info("scoring the %d best recipes again on new folds: %s", len(finalists),
             ", ".join(trial.user_attrs["recipe"] for trial in finalists))
    for finalist in finalists:
        if finalist.number in done:
            continue
        study.enqueue_trial(finalist.params, user_attrs={"rescore_of": finalist.number})
        study.optimize(objective, n_trials=1, catch=(Exception,),
                       callbacks=[_ProgressLog(objective.budget)])
        if study.trials[-1].state != TrialState.COMPLETE:
            return  # the budget ended (or the recipe failed on new folds): choose as it is


def _rescores(study: optuna.Study) -> list[FrozenTrial]:
    return [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "rescore_of" in trial.user_attrs]


def finished_trials(study: optuna.Study) -> dict[str, FrozenTrial]:
    """The first completed trial of each recipe tried, by recipe name (a trial the budget
    stopped does not count: drawn again by a resumed search, it trains on from its
    checkpoints; nor does a finalist's score on new folds)."""
    finished: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "partial" not in trial.user_attrs and "rescore_of" not in trial.user_attrs:
            finished.setdefault(trial.user_attrs.get("recipe"), trial)
    return finished


def recipe_costs(study: optuna.Study) -> dict[str, float]:
    """Seconds each recipe trained when it ran to its end (the longest, if it ran more than
    once: a recipe drawn again resumes its finished run in no time)."""
    costs: dict[str, float] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        recipe, seconds = trial.user_attrs.get("recipe"), trial.user_attrs.get("train_seconds")
        if recipe is not None and seconds is not None:
            costs[recipe] = max(costs.get(recipe, 0.0), float(seconds))
    return costs


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`OutOfBudget` in the main thread once ``seconds`` have passed (a
    SIGALRM timer); in another thread, where no signal can be handled, it only checks
    that time is left."""
    if seconds <= 0:
        raise OutOfBudget("no time left")
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise OutOfBudget(f"after {_duration(seconds)}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _stop_when_nothing_fits(budget: Budget):
    """An Optuna callback: stop once the time left is shorter than every recipe trained so
    far took (no trial could end in time; Optuna's timeout alone would start one more)."""

    def callback(study: optuna.Study, _trial: FrozenTrial) -> None:
        costs = recipe_costs(study)
        if costs and min(costs.values()) > budget.left():
            log.info("stopping: %s left, the quickest recipe took %s",
                     _duration(budget.left()), _duration(min(costs.values())))
            study.stop()

    return callback


@dataclass
class _StopWhenTried:
    """An Optuna callback: stop once every recipe has a score, or once TPE has drawn only
    recipes already tried for ``patience`` trials in a row (it has settled on them)."""

    recipes: int
    patience: int = REPEATS_TO_SETTLE

    def __call__(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        tried = len(finished_trials(study))
        latest = study.get_trials(deepcopy=False)[-self.patience:]
        settled = (len(latest) == self.patience
                   and all("repeat_of" in trial.user_attrs for trial in latest))
        if tried >= self.recipes or settled:
            log.info("stopping: %d of the %d recipes tried%s", tried, self.recipes,
                     "" if tried >= self.recipes else
                     f", and the last {self.patience} trials drew recipes already tried")
            study.stop()


@dataclass
class _ProgressLog:
    """An Optuna callback: one line per trial with its recipe, score, the best so far and
    the time left."""

    budget: Budget

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        left = f"{_duration(self.budget.left())} left"
        recipe = trial.user_attrs.get("recipe", trial.params)
        took = _duration(trial.duration.total_seconds() if trial.duration else 0.0)
        if trial.state == TrialState.COMPLETE:
            best, score = best_recipe(study)
            repeat = trial.user_attrs.get("repeat_of")
            took = f"as trial {repeat}" if repeat is not None else f"in {took}"
            if "rescore_of" in trial.user_attrs:
                took += f" on new folds (trial {trial.user_attrs['rescore_of']} on the first)"
            log.info("trial %d %s: val macro-F1 %.4f %s; best %.4f (trial %d); %s",
                     trial.number, recipe, trial.value, took, score, best.number, left)
        else:
            outcome = "failed" if trial.state == TrialState.FAIL else "stopped"
            reason = (trial.user_attrs.get("fail_reason") or trial.user_attrs.get("stop_reason")
                      or "")
            log.warning("trial %d %s %s: %s; %s", trial.number, recipe, outcome, reason, left)


def _duration(seconds: float) -> str:
    """``42 s`` or ``3.5 min``."""
    seconds = max(seconds, 0.0)
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def best_recipe(study: optuna.Study) -> tuple[FrozenTrial, float] | None:
    """The chosen trial and its score, or None when no trial completed.

    Without finalists scored again: the completed trial with the highest val macro-F1 (the
    first of equals; a trial the budget stopped counts with its best epoch). With them: the
    finalist with the best mean of its first score and its scores on new folds, the others
    having fewer folds behind their (selected, so flattering) scores.
    """
    complete = [trial for trial in study.get_trials(deepcopy=False,
                                                    states=(TrialState.COMPLETE,))
                if "rescore_of" not in trial.user_attrs]
    again: dict[int, list[float]] = {}
    for trial in _rescores(study):
        again.setdefault(trial.user_attrs["rescore_of"], []).append(float(trial.value))
    candidates = [trial for trial in complete if trial.number in again] or complete
    if not candidates:
        return None
    scores = [(trial, float(np.mean([trial.value, *again.get(trial.number, [])])))
              for trial in candidates]
    return max(scores, key=lambda scored: scored[1])
