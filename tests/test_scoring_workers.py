"""Slides scored in worker processes (score.workers) give what the one-process batch gives.

The per-slide guarantees (quarantine with reasons, a server failure that stops the batch
and leaves the slide pending, the stopped run's report) are the sequential batch's, checked
here through the workers; SIGKILL of a parallel batch is in reliability/test_kills.py.
"""

from __future__ import annotations

import json
import queue
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellpipe.slides.batch import ModelKey, ServerFailed, score_inbox, scoring_workers
from cellpipe.slides.scoring import ScoreParams
from cellpipe.slides.workers import _Batcher, _Request
from slide_fixtures import ColourRuleClassifier, smear_inbox

MODEL = ModelKey("colour_rules", "1")
SLIDES = 8


def _params(workers: int) -> ScoreParams:
    return ScoreParams.model_validate({"workers": workers, "cells": {"cell_diameter": 40}})


def _inbox(root: Path) -> Path:
    """Good smears, two files to quarantine and a hidden file."""
    inbox = smear_inbox(root, SLIDES)
    (inbox / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    (inbox / "notes.txt").write_text("stain batch 7\n")
    (inbox / ".DS_Store").write_bytes(b"\0")
    return inbox


class _CountingClassifier(ColourRuleClassifier):
    """Records the size of every request it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[int] = []

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        self.requests.append(len(images))
        return super().classify_images(images)


class _FailsAfter(ColourRuleClassifier):
    """A server that answers ``calls`` requests, then fails every one."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        if self.calls <= 0:
            raise ConnectionError("server unreachable")
        self.calls -= 1
        return super().classify_images(images)


def test_workers_score_exactly_what_one_process_scores(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path)
    one = score_inbox(str(inbox), tmp_path / "one", ColourRuleClassifier(), _params(1), MODEL)
    classifier = _CountingClassifier()
    two = score_inbox(str(inbox), tmp_path / "two", classifier, _params(2), MODEL)
    assert slide_results(tmp_path / "two") == slide_results(tmp_path / "one")
    strip = [{k: v for k, v in s.items() if k != "result"} for s in one["slides"]]
    assert [{k: v for k, v in s.items() if k != "result"} for s in two["slides"]] == strip
    assert two["totals"] == {"scored": SLIDES, "skipped": 0, "quarantined": 2, "ignored": 1}
    assert sum(classifier.requests) >= sum(s["objects"] for s in _summaries(tmp_path / "two"))
    rerun = score_inbox(str(inbox), tmp_path / "two", ColourRuleClassifier(), _params(2), MODEL)
    assert rerun["totals"]["skipped"] == SLIDES


def test_a_server_failure_stops_the_workers_and_a_rerun_completes(tmp_path: Path) -> None:
    inbox, out = _inbox(tmp_path), tmp_path / "results"
    with pytest.raises(ServerFailed, match=r"server unreachable \(slide in flight: slide_"):
        score_inbox(str(inbox), out, _FailsAfter(calls=2), _params(2), MODEL)
    report = json.loads((out / "report.json").read_text())
    assert "server unreachable" in report["stopped"]
    assert not any(s["slide"].startswith("slide_") and s["status"] == "quarantined"
                   for s in report["slides"])
    assert report["totals"]["scored"] < SLIDES
    score_inbox(str(inbox), out, ColourRuleClassifier(), _params(2), MODEL)
    score_inbox(str(inbox), tmp_path / "clean", ColourRuleClassifier(), _params(1), MODEL)
    assert slide_results(out) == slide_results(tmp_path / "clean")


def test_requests_waiting_together_are_classified_in_one_call() -> None:
    """Crops of several slides that wait at once go to the server as one request, and each
    worker gets back exactly its own rows."""
    requests: queue.Queue = queue.Queue()
    responses = [queue.Queue() for _ in range(3)]
    classifier = _CountingClassifier()
    rng = np.random.default_rng(0)
    sent = {slot: rng.integers(0, 256, (slot + 2, 16, 16, 3), dtype=np.uint8) for slot in range(3)}
    for slot, images in sent.items():  # all waiting before the batcher looks
        requests.put(_Request(slot, images))
    with _Batcher(classifier, requests, responses).running():
        answers = {slot: responses[slot].get(timeout=30) for slot in sent}
    assert classifier.requests == [2 + 3 + 4]
    for slot, images in sent.items():
        ok, probabilities = answers[slot]
        assert ok
        np.testing.assert_array_equal(probabilities,
                                      ColourRuleClassifier().classify_images(images))


def test_workers_default_to_every_core_and_small_inboxes_stay_in_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cellpipe.slides.batch.default_workers", lambda: 4)
    assert scoring_workers(ScoreParams(), 100) == 4
    assert scoring_workers(ScoreParams(workers=0), 100) == 4
    assert scoring_workers(ScoreParams(workers=1), 100) == 1
    assert scoring_workers(ScoreParams(workers=3), 9) == 2  # too few files for three
    assert scoring_workers(ScoreParams(workers=2), 3) == 1


def slide_results(out: Path) -> dict[str, object]:
    """Per slide: its counts and every object (scored), or the reason (quarantined)."""
    results: dict[str, object] = {}
    for summary_file in sorted((out / "slides").glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        objects = pd.read_parquet(summary_file.parent / "objects.parquet")
        results[summary["slide"]] = (summary["counts"], objects.to_dict("records"))
    for record_file in sorted((out / "quarantine").glob("*.json")):
        record = json.loads(record_file.read_text())
        results[record["slide"]] = record["reason"]
    return results


def _summaries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "slides").glob("*/summary.json")]
