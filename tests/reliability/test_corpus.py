"""A corpus of bad and unusual inputs (tests/reliability/corpus.py) through every entry point.

Each input gets a clean reason or a correct result, never a traceback; no file vanishes
without a reason; no good neighbour is lost; and the entry points agree on what an image
is: one that ingest, slide scoring or the served decoder refuses, all of them refuse,
and one they accept, they read as the same pixels. The run through a real Triton (its
preprocess model, via ``cellpipe triton classify``) is marked slow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import corpus
import numpy as np
import pytest
from corpus import KINDS, KNOWN_DEFECTS, EntryRun, run_entry, shown_name

from test_serving import exported, server, trained  # noqa: F401 (module fixtures)

SKIPPED = corpus.skipped()
SHARED_ENTRY_POINTS = ("ingest", "score", "served")


def _shared_kinds(entry: str) -> list[corpus.Kind]:
    """Every kind but those that today break ``entry`` as a whole (run on their own)."""
    return [kind for kind in KINDS if (kind.name, entry) not in KNOWN_DEFECTS]


class _Runs(dict):
    """The corpus through each entry point, run the first time a test asks for it."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, entry: str) -> EntryRun:
        self[entry] = run_entry(entry, self.factory.mktemp(f"corpus-{entry}"),
                                _shared_kinds(entry))
        return self[entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(tmp_path_factory)


def _listing(problems: dict[str, str]) -> str:
    """One line per input (a 255-byte name shortened), for an assertion message."""
    def short(text: str) -> str:
        return text if len(text) <= 300 else f"{text[:140]}…{text[-140:]}"

    return "\n".join(short(f"{path!r}: {problem}") for path, problem in problems.items())


def _cases() -> list:
    cases = []
    for kind in KINDS:
        for entry in kind.entry_points:
            if entry == "triton":
                continue  # one CLI run for all: test_the_triton_preprocess_model_…
            marks = []
            if (kind.name, entry) in KNOWN_DEFECTS:
                marks.append(pytest.mark.xfail(strict=True,
                                               reason=KNOWN_DEFECTS[kind.name, entry]))
            cases.append(pytest.param(kind.name, entry, id=f"{entry}-{kind.name}",
                                      marks=marks))
    return cases


def test_the_corpus_has_the_kinds_a_lab_drops() -> None:
    names = [kind.name for kind in KINDS]
    assert len(names) == len(set(names)) and len(names) >= 40
    assert set(SKIPPED) <= {"unreadable_by_permissions", "twelve_bit_jpeg", "lossless_jpeg"}
    assert len([kind for kind in KINDS if kind.layer == "content"]) >= 40


@pytest.mark.parametrize(("kind", "entry"), _cases())
def test_every_input_gets_a_reason_or_a_correct_result(kind: str, entry: str,
                                                       runs: dict[str, EntryRun],
                                                       tmp_path: Path) -> None:
    if kind in SKIPPED:
        pytest.skip(SKIPPED[kind])
    if (kind, entry) in KNOWN_DEFECTS:  # on its own, with good neighbours
        run = run_entry(entry, tmp_path, [k for k in KINDS if k.name == kind])
        problems = run.problems()
    else:
        run = runs[entry]
        problems = {path: problem for path, problem in run.problems().items()
                    if next(i for i in run.inputs if i.path == path).kind == kind}
    assert any(item.kind == kind for item in run.inputs)
    assert not problems, _listing(problems)


@pytest.mark.parametrize("entry", SHARED_ENTRY_POINTS)
def test_no_good_neighbour_is_lost(entry: str, runs: dict[str, EntryRun]) -> None:
    run = runs[entry]
    mates = [item for item in run.inputs if item.kind == "good_neighbour"]
    assert len(mates) == 3
    assert all(run.outcomes[item.path].status == "accepted" for item in mates)


def _entries_under(folder: Path) -> set[str]:
    """Every file, link and FIFO below ``folder`` (links to folders included, not entered)."""
    found = set()
    for current, folders, files in os.walk(folder):
        here = Path(current)
        found |= {(here / name).relative_to(folder).as_posix() for name in files}
        found |= {(here / name).relative_to(folder).as_posix() for name in folders
                  if (here / name).is_symlink()}
    return found


def test_ingest_lists_every_file_in_the_manifest_or_in_rejected_csv(
        runs: dict[str, EntryRun]) -> None:
    import pandas as pd

    run = runs["ingest"]
    source = run.root / "source"
    listed = set(pd.read_parquet(run.root / "out" / "manifest.parquet")["path"])
    listed |= set(pd.read_csv(run.root / "out" / "rejected.csv")["path"])
    on_disk = {shown_name(f"{label}/{path}") for label in ("a", "b")  # as a report shows names
               for path in _entries_under(source / label)}
    assert on_disk - listed == set()
    assert listed - on_disk == set()


def test_scoring_reports_every_file_and_keeps_one_record_per_file(
        runs: dict[str, EntryRun]) -> None:
    run = runs["score"]
    out = run.root / "out"
    report = json.loads((out / "report.json").read_text())
    reported = [slide["slide"] for slide in report["slides"]]
    assert sorted(reported) == sorted(_entries_under(run.root / "inbox"))
    quarantined = {s["slide"] for s in report["slides"] if s["status"] == "quarantined"}
    records = [json.loads(path.read_text())["slide"] for path in (out / "quarantine").iterdir()]
    assert sorted(records) == sorted(quarantined)  # one record each, none shared
    results = [s["result"] for s in report["slides"] if s["status"] == "scored"]
    assert len(set(results)) == len(results) == len(list((out / "slides").iterdir()))
    assert report["totals"]["scored"] == len(results) and "stopped" not in report


def test_entry_points_agree_on_every_single_image(runs: dict[str, EntryRun]) -> None:
    """Refused by one ⇒ refused by all; accepted by all ⇒ the same pixels everywhere."""
    by_entry = {entry: runs[entry] for entry in SHARED_ENTRY_POINTS}
    disagreements = []
    content = [item for item in by_entry["served"].inputs if item.layer == "content"]
    for item in content:
        outcomes = {entry: run.outcomes[item.path] for entry, run in by_entry.items()}
        statuses = {entry: outcome.status for entry, outcome in outcomes.items()}
        if len(set(statuses.values())) != 1:
            disagreements.append(f"{item.kind}: {statuses}")
            continue
        if statuses["served"] != "accepted":
            continue
        served = outcomes["served"].pixels
        if not np.array_equal(outcomes["ingest"].pixels, served):
            disagreements.append(f"{item.kind}: ingest and served read other pixels")
        if np.abs(outcomes["score"].pixels.astype(int) - served).max() > 1:
            disagreements.append(f"{item.kind}: scoring and served read other pixels")
    assert len(content) >= 40
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.slow
def test_the_triton_preprocess_model_refuses_or_classifies_as_served(
        server, tmp_path: Path) -> None:  # noqa: ANN001, F811
    """`cellpipe triton classify` on every content kind: each file classified or rejected
    with its reason, as the served decoder decides; exit 1 while any is rejected, 0 for
    the rest; never a traceback."""
    info, _ = server
    content = [kind for kind in KINDS if kind.layer == "content"]
    folder = tmp_path / "files"
    inputs = corpus.generate(folder, tmp_path / "outside", kinds=content)
    inputs += corpus.neighbours(folder, 3)
    cli = corpus.run_triton(folder, inputs, info.grpc_url)
    assert "Traceback" not in cli.stderr, cli.stderr[-3000:]
    served = corpus.run_served(folder, inputs)
    problems = {}
    for item in inputs:
        outcome = cli.outcomes[item.path]
        problem = corpus.check(item, "triton", outcome)
        if problem is None and outcome.status != served[item.path].status:
            problem = f"{outcome.status} by Triton, {served[item.path].status} in process"
        if problem:
            problems[item.path] = problem
    assert not problems, _listing(problems)
    refused = sum(outcome.status == "refused" for outcome in cli.outcomes.values())
    assert cli.returncode == 1  # documented: 1 when any file could not be classified
    assert f"{refused} of {len(inputs)} files could not be classified" in cli.stderr

    accepted = [item for item in inputs if cli.outcomes[item.path].status == "accepted"]
    again = corpus.run_triton(folder, accepted, info.grpc_url)
    assert again.returncode == 0 and "Traceback" not in again.stderr
    assert {outcome.status for outcome in again.outcomes.values()} == {"accepted"}
