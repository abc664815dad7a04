"""Every inbox file gets a result or a reason; names never collide; links stay inside."""

from __future__ import annotations

import json
from pathlib import Path

from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier, write_smear

MODEL = ModelKey("colour_rules", "1")
PARAMS = ScoreParams(cells=CellFinderParams(cell_diameter=40))


def _statuses(report: dict) -> dict[str, tuple[str, str | None]]:
    return {s["slide"]: (s["status"], s["reason"]) for s in report["slides"]}


def test_hidden_files_are_listed_with_a_reason(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "results"
    (inbox / ".thumbs").mkdir(parents=True)
    write_smear(inbox / "slide.png", seed=0)
    write_smear(inbox / "..dotdot.png", seed=1)
    write_smear(inbox / ".thumbs" / "small.png", seed=2)
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    statuses = _statuses(report)
    assert set(statuses) == {"slide.png", "..dotdot.png", ".thumbs/small.png"}
    assert statuses["slide.png"][0] == "scored"
    for hidden in ("..dotdot.png", ".thumbs/small.png"):
        status, reason = statuses[hidden]
        assert status == "ignored" and "hidden file" in reason
    # Listed, but no slide that failed: no quarantine record, and --strict is not set off.
    assert report["totals"] == {"scored": 1, "skipped": 0, "quarantined": 0, "ignored": 2}
    assert not (out / "quarantine").exists()


def test_names_that_sanitise_alike_keep_their_own_results_and_quarantine(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "results"
    (inbox / "dup").mkdir(parents=True)
    (inbox / "dup" / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (inbox / "dup_trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated too")
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"]["quarantined"] == 2
    records = {json.loads(p.read_text())["slide"] for p in (out / "quarantine").iterdir()}
    assert records == {"dup/trunc.jpg", "dup_trunc.jpg"}

    write_smear(inbox / "dup_trunc.jpg", seed=3)  # one is fixed: the other stays quarantined
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert _statuses(report)["dup_trunc.jpg"][0] == "scored"
    records = [json.loads(p.read_text())["slide"] for p in (out / "quarantine").iterdir()]
    assert records == ["dup/trunc.jpg"]

    write_smear(inbox / "dup" / "trunc.jpg", seed=3)  # same bytes as its look-alike
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert _statuses(report)["dup/trunc.jpg"][0] == "scored"
    assert len(list((out / "slides").iterdir())) == 2  # one result each, not one shared


def test_links_out_of_the_inbox_are_refused_unless_allowed(tmp_path: Path) -> None:
    inbox, out, elsewhere = tmp_path / "inbox", tmp_path / "results", tmp_path / "private"
    inbox.mkdir()
    elsewhere.mkdir()
    write_smear(elsewhere / "secret.png", seed=4)
    write_smear(inbox / "slide.png", seed=5)
    (inbox / "outside.png").symlink_to(elsewhere / "secret.png")
    (inbox / "linked_dir").symlink_to(elsewhere, target_is_directory=True)
    (inbox / "inside.png").symlink_to(inbox / "slide.png")
    (inbox / "passwd.png").symlink_to("/etc/passwd")
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    statuses = _statuses(report)
    assert statuses["slide.png"][0] == statuses["inside.png"][0] == "scored"
    for refused in ("outside.png", "passwd.png", "linked_dir"):  # a linked folder too
        status, reason = statuses[refused]
        assert status == "quarantined" and "outside the inbox" in reason
    assert not list(out.rglob("secret*"))

    allowed = PARAMS.model_copy(update={"follow_links_out": True})
    report = score_inbox(str(inbox), tmp_path / "allowed", ColourRuleClassifier(), allowed,
                         MODEL)
    assert _statuses(report)["outside.png"][0] == "scored"


def test_results_of_earlier_runs_under_unhashed_names_are_kept(tmp_path: Path) -> None:
    """Before sanitised names carried a hash, day1/slide.png's result was day1_slide-…:
    a rerun finds it instead of scoring the slide again (and listing it twice)."""
    import re

    import pandas as pd

    inbox, out = tmp_path / "inbox", tmp_path / "results"
    (inbox / "day1").mkdir(parents=True)
    write_smear(inbox / "day1" / "slide.png", seed=6)
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    (folder,) = (out / "slides").iterdir()
    legacy = re.sub(r"~[0-9a-f]{8}", "", folder.name)
    assert legacy != folder.name
    folder.rename(out / "slides" / legacy)  # as an earlier version named it

    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"] == {"scored": 0, "skipped": 1, "quarantined": 0, "ignored": 0}
    assert report["slides"][0]["result"] == f"slides/{legacy}"
    assert list(pd.read_csv(out / "summary.csv")["slide"]) == ["day1/slide.png"]
