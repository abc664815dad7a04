"""A slide that breaks anywhere in its own processing is quarantined; the batch goes on.

Only the server and the results disk may stop a batch: their failures say nothing
about the slides, which must stay pending for the next run.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellpipe.errors import CellpipeError
from cellpipe.slides import batch
from cellpipe.slides.batch import ModelKey, ServerFailed, score_inbox
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier, smear_inbox, write_smear

MODEL = ModelKey("colour_rules", "1")
PARAMS = ScoreParams(cells=CellFinderParams(cell_diameter=40))



def _reasons(report: dict) -> dict[str, str]:
    return {s["slide"]: s["reason"] for s in report["slides"] if s["status"] == "quarantined"}


def test_a_five_channel_tiff_is_quarantined_and_the_batch_goes_on(tmp_path: Path) -> None:
    inbox, out = smear_inbox(tmp_path, 2), tmp_path / "results"
    tifffile.imwrite(inbox / "poison.tif", np.zeros((5, 64, 64), np.uint8),
                     photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(inbox / "poison_contig.tif", np.zeros((64, 64, 5), np.uint8),
                     photometric="minisblack", planarconfig="contig")
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"] == {"scored": 2, "skipped": 0, "quarantined": 2, "ignored": 0}
    reasons = _reasons(report)
    assert "channel count 5" in reasons["poison_contig.tif"]
    assert reasons["poison.tif"]
    assert (out / "report.json").is_file() and (out / "summary.csv").is_file()

    # A good slide added later is scored by the next run, past the poison ones.
    write_smear(inbox / "later.png", seed=7)
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"] == {"scored": 1, "skipped": 2, "quarantined": 2, "ignored": 0}
    assert "later.png" in set(pd.read_csv(out / "summary.csv")["slide"])


@pytest.mark.parametrize("failure", [RuntimeError("segmentation blew up"),
                                     KeyError("label"), IndexError("out of bounds"),
                                     AssertionError("an internal check")])
def test_any_error_in_one_slide_quarantines_that_slide(tmp_path: Path, monkeypatch,
                                                       failure: Exception) -> None:
    inbox, out = smear_inbox(tmp_path, 3), tmp_path / "results"
    real = batch.score_slide

    def breaks_on_slide_01(reader, classifier, params):  # noqa: ANN001, ANN202
        if reader.path.name == "slide_01.png":
            raise failure
        return real(reader, classifier, params)

    monkeypatch.setattr(batch, "score_slide", breaks_on_slide_01)
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"] == {"scored": 2, "skipped": 0, "quarantined": 1, "ignored": 0}
    assert type(failure).__name__ in _reasons(report)["slide_01.png"]


def test_a_slide_whose_result_cannot_be_written_is_quarantined(tmp_path: Path,
                                                              monkeypatch) -> None:
    inbox, out = smear_inbox(tmp_path, 3), tmp_path / "results"
    real = batch.write_result

    def bad_table(target, result, summary):  # noqa: ANN001, ANN202
        if summary["slide"] == "slide_02.png":
            raise ValueError("cannot convert column 'label' to Arrow")
        return real(target, result, summary)

    monkeypatch.setattr(batch, "write_result", bad_table)
    report = score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert report["totals"] == {"scored": 2, "skipped": 0, "quarantined": 1, "ignored": 0}
    assert "Arrow" in _reasons(report)["slide_02.png"]
    assert not list((out / "slides").glob(".*"))  # no partial folder left behind


def test_a_full_results_disk_stops_the_batch_and_quarantines_nothing(tmp_path: Path,
                                                                   monkeypatch) -> None:
    inbox, out = smear_inbox(tmp_path, 3), tmp_path / "results"

    def disk_full(target, result, summary):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "write_result", disk_full)
    with pytest.raises(CellpipeError, match="slide_00.png.*No space left"):
        score_inbox(str(inbox), out, ColourRuleClassifier(), PARAMS, MODEL)
    assert not (out / "quarantine").exists()


@pytest.mark.parametrize("failure", [
    CellpipeError("Triton at 127.0.0.1:1 (grpc) failed after 3 retries"),
    TypeError("the server answered something unexpected")])
def test_a_classifier_error_names_the_slide_in_flight_and_stops(tmp_path: Path,
                                                               failure: Exception) -> None:
    class Broken(ColourRuleClassifier):
        def classify_images(self, images: np.ndarray) -> np.ndarray:
            raise failure

    inbox, out = smear_inbox(tmp_path, 2), tmp_path / "results"
    with pytest.raises(CellpipeError, match=f"{re.escape(str(failure))}.*slide_00.png"):
        score_inbox(str(inbox), out, Broken(), PARAMS, MODEL)
    assert not (out / "quarantine").exists()
    assert not list((out / "slides").glob("*")) if (out / "slides").exists() else True
    report = json.loads((out / "report.json").read_text())  # the stopped run says why
    assert str(failure) in report["stopped"] and report["totals"]["scored"] == 0


class _LocalClient(ColourRuleClassifier):
    """Stands in for TritonClassifier in the flow: the colour rules, no server."""

    server_down = False  # every classification fails, as with a server that went away

    def __init__(self, *_: object, **__: object) -> None:
        super().__init__()

    def __enter__(self) -> _LocalClient:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def pin_served_version(self) -> str:
        return "1"

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        if self.server_down:
            raise CellpipeError("Triton at 127.0.0.1:1 (grpc) failed after 2 retries")
        return super().classify_images(images)


def _run_flow(tmp_path: Path, inbox: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    import flows.scoring as scoring_flow

    monkeypatch.setattr(scoring_flow, "TritonClassifier", _LocalClient)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("score:\n  cells:\n    cell_diameter: 40\n")
    with prefect_test_harness(server_startup_timeout=90):
        return scoring_flow.scoring(str(inbox), str(out), url="127.0.0.1:1",
                                    model_name="colour_rules", params_file=str(params_file))


def test_the_prefect_flow_quarantines_a_poison_slide_and_scores_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scoring flow's per-slide task shares score_and_write, and so its guarantees;
    a server failure stops the flow, which still reports what it did and why it stopped."""
    inbox, out = smear_inbox(tmp_path, 2), tmp_path / "results"
    tifffile.imwrite(inbox / "poison.tif", np.zeros((64, 64, 5), np.uint8),
                     photometric="minisblack", planarconfig="contig")
    monkeypatch.setattr(_LocalClient, "server_down", True)
    with pytest.raises(ServerFailed, match="failed after 2 retries"):
        _run_flow(tmp_path, inbox, out, monkeypatch)
    stopped = json.loads((out / "report.json").read_text())
    assert "failed after 2 retries" in stopped["stopped"]
    assert stopped["totals"]["scored"] == 0 and not list((out / "slides").glob("slide_*"))

    monkeypatch.setattr(_LocalClient, "server_down", False)
    run = _run_flow(tmp_path, inbox, out, monkeypatch)
    assert run["totals"] == {"scored": 2, "skipped": 0, "quarantined": 1, "ignored": 0}
    assert "channel count 5" in _reasons(run)["poison.tif"]
    assert "stopped" not in run


def test_a_server_failing_while_its_contract_is_read_stops_the_batch(tmp_path: Path) -> None:
    """The first request of a client may be the contract: its failure is the server's."""

    class ContractUnreachable(ColourRuleClassifier):
        @property
        def contract(self):  # noqa: ANN202
            raise CellpipeError("Triton at 127.0.0.1:1 (grpc) failed after 2 retries")

        @contract.setter
        def contract(self, _value: object) -> None:
            pass

    inbox, out = smear_inbox(tmp_path, 2), tmp_path / "results"
    with pytest.raises(ServerFailed, match="failed after 2 retries.*slide_00.png"):
        score_inbox(str(inbox), out, ContractUnreachable(), PARAMS, MODEL)
    assert not (out / "quarantine").exists()
