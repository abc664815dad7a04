"""A Triton server that freezes, is killed or is stopped mid-batch stops the batch within
the configured budget, names the slide in flight and loses nothing; once the server is
back, a rerun completes to the same results as a clean run."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cellpipe.serving import triton_config
from cellpipe.serving.client import TritonClassifier
from cellpipe.serving.repository import ModelRepository
from cellpipe.serving.server import LocalTriton, ServerInfo, free_port
from cellpipe.slides.batch import ModelKey, ServerFailed, score_inbox
from cellpipe.slides.scoring import ScoreParams, TileParams
from test_scoring_served import _slide_results, _striped_slide
from test_serving import exported, trained  # noqa: F401 (module fixtures)

PARAMS = ScoreParams(mode="tiles", tiles=TileParams(size=32, min_tissue=0.0),
                     request_timeout_s=1.0, retries=1)


class _OwnServer:
    """A local Triton of this test's own, which the test may freeze, kill or stop."""

    def __init__(self, root: Path, repository: Path) -> None:
        self.root, self.repository, self.starts = root, repository, 0
        self.info = self.start()

    def start(self) -> ServerInfo:
        # A fresh state folder each time: a killed server's backend stubs may still hold
        # the old one's files for a moment.
        self.starts += 1
        self.local = LocalTriton(self.root / f"state{self.starts}")
        self.info = self.local.start(self.repository, http_port=free_port(),
                                     grpc_port=free_port(), metrics_port=free_port())
        return self.info

    def freeze(self) -> None:
        os.kill(self.info.pid, signal.SIGSTOP)

    def kill(self) -> None:
        os.kill(self.info.pid, signal.SIGKILL)

    def stop(self) -> None:
        self.local.stop()


@pytest.fixture
def own_server(tmp_path: Path, exported: Path) -> Iterator[_OwnServer]:  # noqa: F811
    repository = tmp_path / "triton_repo"
    ModelRepository(repository, triton_config.ServingParams()).publish(exported)
    server = _OwnServer(tmp_path, repository)
    try:
        yield server
    finally:
        os.kill(server.info.pid, signal.SIGCONT) if _alive(server.info.pid) else None
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class _OutageBeforeSecondSlide:
    """The real client; ``outage`` strikes the server just before the second slide's request."""

    def __init__(self, client: TritonClassifier, outage: Callable[[], None]) -> None:
        self._client, self._outage, self.calls = client, outage, 0
        self.contract = client.contract
        self.model_name, self.model_version = client.model_name, client.model_version

    def classify_images(self, images):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.calls == 2:
            self._outage()
        return self._client.classify_images(images)


def _recover(server: _OwnServer, how: str) -> None:
    if how == "frozen":
        os.kill(server.info.pid, signal.SIGCONT)
    else:
        if how == "killed":
            server.local.stop()  # clears the state of the dead process
        server.start()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["frozen", "killed", "stopped"])
def test_an_outage_mid_batch_stops_within_its_budget_and_a_rerun_completes(
        own_server: _OwnServer, tmp_path: Path, how: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for index in range(3):
        _striped_slide(inbox / f"slide_{index}.png", index)
    with TritonClassifier(own_server.info.grpc_url) as client:
        model = ModelKey(client.model_name, client.pin_served_version())
        score_inbox(str(inbox), tmp_path / "clean", client, PARAMS, model)

    out = tmp_path / "results"
    outage = {"frozen": own_server.freeze, "killed": own_server.kill,
              "stopped": own_server.stop}[how]
    budget_s = (PARAMS.retries + 1) * PARAMS.request_timeout_s + 0.5  # + the client's backoff
    with TritonClassifier(own_server.info.grpc_url, model_version=model.version,
                          timeout_s=PARAMS.request_timeout_s, retries=PARAMS.retries) as client:
        started = time.monotonic()
        with pytest.raises(ServerFailed, match=r"slide in flight: slide_1\.png") as raised:
            score_inbox(str(inbox), out, _OutageBeforeSecondSlide(client, outage), PARAMS,
                        model)
        stopped_after = time.monotonic() - started
        _recover(own_server, how)
    assert "failed after 1 retries" in str(raised.value)
    assert stopped_after < budget_s + 10  # the budget, not the old 4 × 60 s
    report = json.loads((out / "report.json").read_text())
    assert report["totals"] == {"scored": 1, "skipped": 0, "quarantined": 0, "ignored": 0}
    assert "slide_1.png" in report["stopped"]
    assert not (out / "quarantine").exists()  # an outage is never the slides' fault

    with TritonClassifier(own_server.info.grpc_url, model_version=model.version) as client:
        report = score_inbox(str(inbox), out, client, PARAMS, model)
    assert report["totals"] == {"scored": 2, "skipped": 1, "quarantined": 0, "ignored": 0}
    assert "stopped" not in report
    assert _slide_results(out) == _slide_results(tmp_path / "clean")


def test_the_default_budget_gives_up_in_under_a_minute() -> None:
    params = ScoreParams()
    backoff_s = sum(0.5 * 2 ** attempt for attempt in range(params.retries))
    assert (params.retries + 1) * params.request_timeout_s + backoff_s < 60
