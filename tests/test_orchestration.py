"""Prefect's settings for this project: a dashboard that reaches its API, quiet logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cellpipe.orchestration import (
    OFFLINE_SETTINGS,
    PrefectServer,
    dashboard_environment,
    prefect_environment,
)


def test_the_dashboard_asks_its_own_server_and_stays_offline(tmp_path: Path) -> None:
    server = PrefectServer(tmp_path / "prefect", 4321)
    assert server.dashboard_url == "http://127.0.0.1:4321"
    settings = dashboard_environment(server.home, server.api_url)
    assert settings["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    assert settings["PREFECT_SERVER_UI_ENABLED"] == "true"
    assert Path(settings["PREFECT_UI_STATIC_DIRECTORY"]).is_relative_to(tmp_path.resolve())
    assert settings["PREFECT_SERVER_UI_V2_ENABLED"] == "false"  # V2 starts Amplitude
    # Analytics stay off everywhere; ephemeral runs keep the UI off (nobody could open it).
    for environment in (prefect_environment(tmp_path), OFFLINE_SETTINGS):
        assert environment["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        assert environment["DO_NOT_TRACK"] == "1"
        assert environment["PREFECT_SERVER_UI_ENABLED"] == "false"


_LOGGING_PROBE = """
import logging, sys
from pathlib import Path
if sys.argv[1] == "cli":  # `cellpipe flows run`: our logging first, then Prefect's own
    from cellpipe.logs import configure_logging
    configure_logging()
from cellpipe.orchestration import apply_prefect_environment
apply_prefect_environment(Path(sys.argv[2]))
import prefect
from prefect.logging.configuration import setup_logging
setup_logging(incremental=False)  # what a flow-run process does at its start
logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1/api/logs/ 201")
logging.getLogger("httpcore.http11").info("send_request_headers.started")
logging.getLogger("prefect.flow_runs").warning("a flow-run line still shows")
"""


def test_flow_runs_do_not_log_every_http_request(tmp_path: Path) -> None:
    """`cellpipe flows run` and a served deployment's flow-run process (Prefect's logging
    only) keep httpx and httpcore below INFO, while flow-run lines still show."""
    for mode in ("cli", "runner"):
        probe = subprocess.run([sys.executable, "-c", _LOGGING_PROBE, mode, str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        assert "a flow-run line still shows" in probe.stderr
        assert "HTTP Request" not in probe.stderr and "send_request_headers" not in probe.stderr
