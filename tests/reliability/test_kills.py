"""Randomised SIGKILL of slide scoring: a killed batch, rerun, equals a clean run.

Each trial starts a scoring batch in a subprocess (what ``cellpipe score`` runs, with the
colour-rule classifier slowed down so the batch lasts a moment), kills it with SIGKILL
at a seeded random time, sometimes kills the rerun too, then reruns it to the end. The
result is compared slide by slide with a clean run: the same slides scored with the same
counts and objects, the same ones quarantined with the same reasons, nothing lost,
nothing twice, and no partial result or temporary folder left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier, write_smear

MODEL = ModelKey("colour_rules", "1")
DELAY_S = 0.1  # per classifier call: a batch of GOOD_SLIDES lasts about a second
GOOD_SLIDES = 8
TESTS = Path(__file__).resolve().parents[1]

# One scoring batch, as `cellpipe score` runs it, with a slowed classifier. It prints a
# line once its imports are done, so that kill times count from the batch's start.
_KILLABLE_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier
params = ScoreParams.model_validate({params!r})
print("scoring", flush=True)
score_inbox({inbox!r}, Path({out!r}), ColourRuleClassifier(delay_s={delay!r}), params,
            ModelKey("colour_rules", "1"))
"""


def score_params(workers: int = 1) -> ScoreParams:
    """Scoring params of every run here; ``workers`` where scoring has that param."""
    params: dict[str, object] = {"cells": {"cell_diameter": 40}}
    if parallel_scoring():  # explicit: the default is every core
        params["workers"] = workers
    return ScoreParams.model_validate(params)


def parallel_scoring() -> bool:
    """Whether scoring has a ``workers`` param (score.workers) to kill in parallel."""
    return "workers" in ScoreParams.model_fields


def make_inbox(inbox: Path) -> Path:
    """Good slides, files that are quarantined (a truncated JPEG, text), a hidden file."""
    inbox.mkdir(parents=True)
    for index in range(GOOD_SLIDES):
        write_smear(inbox / f"slide_{index:02d}.png", seed=index, size=(240, 180))
    (inbox / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    write_smear(inbox / ".hidden.png", seed=99, size=(240, 180))
    (inbox / "notes.txt").write_text("stain batch 7\n")
    return inbox


def slide_results(out: Path) -> dict[str, object]:
    """Per slide: counts and every object (scored), or the reason (quarantined)."""
    results: dict[str, object] = {}
    for summary_file in sorted((out / "slides").glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        objects = pd.read_parquet(summary_file.parent / "objects.parquet")
        rows = objects.drop(columns=[c for c in objects if "time" in c]).round(6)
        assert summary["slide"] not in results, f"{summary['slide']} has two results"
        results[summary["slide"]] = ("scored", summary["counts"], rows.to_dict("records"))
    for record_file in sorted((out / "quarantine").glob("*.json")):
        record = json.loads(record_file.read_text())
        assert record["slide"] not in results, f"{record['slide']} is scored and quarantined"
        results[record["slide"]] = ("quarantined", record["reason"])
    return results


def _temporary(out: Path) -> list[Path]:
    """What atomic writes leave when killed: '.<name>.<random>.tmp' files and folders, and
    the '.<name>.old-<pid>' of a result being replaced."""
    return [path for path in out.rglob(".*")
            if path.name.endswith(".tmp") or ".old-" in path.name]


def leftovers(out: Path) -> list[str]:
    """Partial results: temporary folders anywhere, and anything temporary in slides/."""
    return sorted(path.relative_to(out).as_posix() for path in _temporary(out)
                  if path.is_dir() or path.parent == out / "slides")


def stray_files(out: Path) -> list[str]:
    """Temporary files of a killed record or report write (quarantine/, runs/, out/) left
    after the rerun, which sweeps them."""
    return sorted(path.relative_to(out).as_posix() for path in _temporary(out)
                  if not path.is_dir() and path.parent != out / "slides")


@dataclass
class Trial:
    seed: int
    kills: list[float]  # seconds into each killed batch
    killed: int  # kills that struck a running batch (not one that had already ended)
    lost: list[str]
    duplicated: list[str]
    different: list[str]
    leftovers: list[str]
    stray_files: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.different or self.leftovers
                    or self.stray_files)


def clean_run(inbox: Path, out: Path, workers: int = 1) -> tuple[dict[str, object], float]:
    """The reference: one uninterrupted batch, and how long it took (at DELAY_S)."""
    started = time.monotonic()
    score_inbox(str(inbox), out, ColourRuleClassifier(delay_s=DELAY_S), score_params(workers),
                MODEL)
    return slide_results(out), time.monotonic() - started


def _killed_batch(inbox: Path, out: Path, after_s: float, workers: int) -> bool:
    """Start a batch, SIGKILL it ``after_s`` into it; whether it was still running."""
    script = _KILLABLE_RUN.format(tests=str(TESTS), inbox=str(inbox), out=str(out),
                                  delay=DELAY_S, params=score_params(workers).model_dump())
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert run.stdout is not None and run.stdout.readline().strip() == "scoring"
        time.sleep(after_s)
        running = run.poll() is None
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if run.stdout is not None:
            run.stdout.close()
    return running


def kill_trial(inbox: Path, out: Path, clean: dict[str, object], batch_s: float, seed: int,
               *, workers: int = 1) -> Trial:
    """Kill a batch once or twice (seeded) at random times, rerun it, compare with ``clean``."""
    rng = random.Random(seed)
    started = time.monotonic()
    # Odd seeds kill the rerun too, early: by then part of the batch is done.
    kills = [round(rng.uniform(0.0, 0.9 * batch_s), 3)]
    kills += [round(rng.uniform(0.0, 0.3 * batch_s), 3) for _ in range(seed % 2)]
    killed = sum(_killed_batch(inbox, out, after_s, workers) for after_s in kills)
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), score_params(workers), MODEL)
    results = slide_results(out)
    scored = [s["slide"] for s in report["slides"] if s["status"] in ("scored", "skipped")]
    summary = pd.read_csv(out / "summary.csv")["slide"].tolist()
    duplicated = sorted({slide for slide in summary if summary.count(slide) > 1}
                        | {slide for slide in scored if scored.count(slide) > 1})
    return Trial(seed=seed, kills=kills, killed=killed,
                 lost=sorted(set(clean) - set(results)),
                 duplicated=duplicated,
                 different=sorted(slide for slide in set(clean) & set(results)
                                  if clean[slide] != results[slide]),
                 leftovers=leftovers(out), stray_files=stray_files(out),
                 seconds=round(time.monotonic() - started, 2))


def run_trials(root: Path, trials: int, *, first_seed: int = 19, workers: int = 1
               ) -> tuple[list[Trial], dict[str, object], float]:
    """``trials`` kill trials on one inbox, each into a fresh results folder."""
    inbox = make_inbox(root / "inbox")
    clean, batch_s = clean_run(inbox, root / "clean", workers)
    done = [kill_trial(inbox, root / f"trial_{seed}", clean, batch_s, seed, workers=workers)
            for seed in range(first_seed, first_seed + trials)]
    return done, clean, batch_s


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2] if parallel_scoring() else [1])
def test_randomly_killed_batches_rerun_to_the_clean_result(tmp_path: Path,
                                                          workers: int) -> None:
    trials, clean, batch_s = run_trials(tmp_path, 10, workers=workers)
    assert sorted(s for s, r in clean.items() if r[0] == "scored") == \
        [f"slide_{index:02d}.png" for index in range(GOOD_SLIDES)]
    assert {s for s, r in clean.items() if r[0] == "quarantined"} == \
        {"truncated.jpg", "notes.txt"}  # the hidden file is ignored: no record
    assert sum(trial.killed for trial in trials) >= 12, \
        f"too few kills struck a running batch (it took {batch_s:.2f} s)"
    failed = [trial for trial in trials if not trial.ok]
    assert not failed, "\n".join(map(str, failed))
