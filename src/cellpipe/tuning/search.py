"""The study: each trial preprocesses at its input size and trains with the train stage's
own core function; its score is the run's best val macro-F1. The test split is left out
of everything the search reads.

The study lives in SQLite under the output folder, so a stopped search resumes where it
was (``load_if_exists``). Shards are cached per input size. A recipe drawn again gets its
first score (seeded training would only repeat it), and each recipe trains in a folder of
its own, so one that a stopped search had begun resumes from its checkpoints. The search
ends early once every recipe has a score, or once TPE keeps drawing tried ones.

The first trial is the cheapest recipe (:func:`cheapest_recipe`). The budget holds in
three ways: Optuna starts no trial after the timeout; a trial whose
recipe took longer before than the time left is not started (the search stops there);
and a trial still training when the budget ends is stopped and recorded as pruned.
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

import optuna
from optuna.trial import FrozenTrial, TrialState

from cellpipe.data.manifest import Manifest, read_manifest
from cellpipe.engine.loop import Device
from cellpipe.errors import InputError
from cellpipe.fsutil import file_sha256
from cellpipe.stages import preprocess as preprocess_stage
from cellpipe.stages import train as train_stage
from cellpipe.stages.preprocess import PreprocessParams
from cellpipe.stages.train import TrainParams
from cellpipe.tuning.space import (
    DEFAULT_EPOCHS,
    SearchSpace,
    all_recipes,
    apply,
    build_space,
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


class OutOfBudget(Exception):
    """The budget ended while a trial was training."""


@dataclass
class Budget:
    """Wall-clock seconds for the whole search, counted from its creation."""

    minutes: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.minutes * 60 - (time.monotonic() - self.started)


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
    objective = _Objective(inputs, listed, space, out, budget, device, workers)
    try:
        study.optimize(objective, n_trials=max_trials, timeout=max(budget.left(), 0),
                       catch=(Exception,),  # a failing recipe is recorded; the search goes on
                       callbacks=[_ProgressLog(budget), _stop_when_nothing_fits(budget),
                                  _StopWhenTried(len(all_recipes(space)))])
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
        space = build_space(listed, inputs.train, epochs or DEFAULT_EPOCHS)
        study.set_user_attr("space", space.to_dict())
        study.enqueue_trial(cheapest_recipe(space))
        log.info("new study %s in %s: input sizes %s, %s (%d blocks; truncated: first %d), "
                 "small CNN from scratch; epochs per unit: %d", name, out / STUDY_FILE,
                 list(space.sizes), space.backbone, space.blocks, space.truncated_blocks,
                 space.epochs)
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
    15,000-image set takes minutes on 2 cores) still chooses a recipe."""
    return {"image_size": min(space.sizes), "model": "whole", "training": "head"}


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


@dataclass
class _Objective:
    """One trial: draw a recipe, preprocess at its size (once per size), train it."""

    inputs: TuneInputs
    listed: Manifest
    space: SearchSpace
    out: Path
    budget: Budget
    device: str
    workers: int

    def __call__(self, trial: optuna.Trial) -> float:
        choices = suggest(trial, self.space)
        name = recipe_name(choices)
        trial.set_user_attr("recipe", name)
        earlier = finished_trials(trial.study).get(name)
        if earlier is not None:
            # Seeded training on the same data gives the same score again: tell TPE that
            # score instead of training it again (and of telling it nothing).
            trial.set_user_attr("repeat_of", earlier.number)
            return float(earlier.value)
        try:
            return self._train(trial, choices, name)
        except OutOfBudget as stop:
            reason = f"stopped at the end of the budget ({stop})"
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
        shards = self._shards(preprocess)
        folder = self.out / "trials" / name
        started = time.monotonic()
        with deadline(self.budget.left()):
            outcome = train_stage.train(
                shards, params, device=Device.pick(self.device),
                checkpoints=folder / "checkpoints",
                fingerprint=train_stage.fingerprint_of(params, self.inputs.manifest, shards))
        history = outcome.result.history
        best = max(history, key=lambda record: record["val_macro_f1"]) if history else {}
        trial.set_user_attr("train_seconds", round(time.monotonic() - started, 1))
        trial.set_user_attr("epochs_run", len(history))
        trial.set_user_attr("best_phase", best.get("phase"))
        trial.set_user_attr("val_accuracy", best.get("val_accuracy"))
        return float(outcome.result.best_score)

    def _shards(self, params: PreprocessParams) -> Path:
        """The train and val shards at ``params.image_size``, preprocessed on first use."""
        key = hashlib.sha256(json.dumps([file_sha256(self.inputs.manifest),
                                         params.model_dump(), sorted(self.listed.rows["split"]
                                                                     .unique())]).encode())
        folder = self.out / "shards" / f"{params.image_size}px-{key.hexdigest()[:10]}"
        if not (folder / "meta.json").is_file():
            log.info("preprocessing the train and val images at %d px into %s",
                     params.image_size, folder)
            _, rejected = preprocess_stage.preprocess(self.listed, self.inputs.source, folder,
                                                      params, workers=self.workers)
            if rejected:
                log.warning("%d images failed to decode at %d px (first: %s: %s)",
                            len(rejected), params.image_size, rejected[0].path,
                            rejected[0].reason)
        return folder


def finished_trials(study: optuna.Study) -> dict[str, FrozenTrial]:
    """The first completed trial of each recipe tried, by recipe name."""
    finished: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
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
            best = best_trial(study)
            repeat = trial.user_attrs.get("repeat_of")
            took = f"as trial {repeat}" if repeat is not None else f"in {took}"
            log.info("trial %d %s: val macro-F1 %.4f %s; best %.4f (trial %d); %s",
                     trial.number, recipe, trial.value, took, best.value, best.number, left)
        else:
            outcome = "failed" if trial.state == TrialState.FAIL else "stopped"
            reason = (trial.user_attrs.get("fail_reason") or trial.user_attrs.get("stop_reason")
                      or "")
            log.warning("trial %d %s %s: %s; %s", trial.number, recipe, outcome, reason, left)


def _duration(seconds: float) -> str:
    """``42 s`` or ``3.5 min``."""
    seconds = max(seconds, 0.0)
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed trial with the highest val macro-F1 (the first of equals), or None."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda trial: trial.value, default=None)
