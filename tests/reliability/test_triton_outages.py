"""A Triton server that freezes mid-batch stops the batch within the configured budget,
names the slide in flight, loses nothing, and a rerun completes the batch."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cellpipe.serving.client import TritonClassifier
from cellpipe.serving.server import ServerInfo
from cellpipe.slides.batch import ModelKey, ServerFailed, score_inbox
from cellpipe.slides.scoring import ScoreParams, TileParams
from test_scoring_served import _striped_slide
from test_serving import exported, server, trained  # noqa: F401 (module fixtures)

PARAMS = ScoreParams(mode="tiles", tiles=TileParams(size=32, min_tissue=0.0),
                     request_timeout_s=1.0, retries=1)


class _FreezesTheServer:
    """The real client, which SIGSTOPs the server just before the second slide's request."""

    def __init__(self, client: TritonClassifier, pid: int) -> None:
        self._client, self._pid, self.calls = client, pid, 0
        self.contract = client.contract
        self.model_name, self.model_version = client.model_name, client.model_version

    def classify_images(self, images):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.calls == 2:
            os.kill(self._pid, signal.SIGSTOP)
        return self._client.classify_images(images)


@pytest.mark.slow
def test_a_frozen_server_stops_the_batch_within_its_budget_and_a_rerun_completes(
        server: tuple[ServerInfo, Path], tmp_path: Path) -> None:  # noqa: F811
    info, _ = server
    inbox, out = tmp_path / "inbox", tmp_path / "results"
    inbox.mkdir()
    for index in range(3):
        _striped_slide(inbox / f"slide_{index}.png", index)
    budget_s = (PARAMS.retries + 1) * PARAMS.request_timeout_s + 0.5  # + the client's backoff
    with TritonClassifier(info.grpc_url, timeout_s=PARAMS.request_timeout_s,
                          retries=PARAMS.retries) as client:
        model = ModelKey(client.model_name, client.pin_served_version())
        freezing = _FreezesTheServer(client, info.pid)
        started = time.monotonic()
        try:
            with pytest.raises(ServerFailed, match=r"slide in flight: slide_1\.png") as raised:
                score_inbox(str(inbox), out, freezing, PARAMS, model)
            stopped_after = time.monotonic() - started
        finally:
            os.kill(info.pid, signal.SIGCONT)
    assert "failed after 1 retries" in str(raised.value)
    assert stopped_after < budget_s + 10  # the budget, not the old 4 × 60 s
    report = json.loads((out / "report.json").read_text())
    assert report["totals"] == {"scored": 1, "skipped": 0, "quarantined": 0}
    assert "slide_1.png" in report["stopped"]
    assert not (out / "quarantine").exists()  # an outage is never the slides' fault

    with TritonClassifier(info.grpc_url) as client:
        report = score_inbox(str(inbox), out, client, PARAMS, model)
    assert report["totals"] == {"scored": 2, "skipped": 1, "quarantined": 0}
    assert "stopped" not in report
    assert len(list((out / "slides").iterdir())) == 3


def test_the_default_budget_gives_up_in_under_a_minute() -> None:
    params = ScoreParams()
    backoff_s = sum(0.5 * 2 ** attempt for attempt in range(params.retries))
    assert (params.retries + 1) * params.request_timeout_s + backoff_s < 60

