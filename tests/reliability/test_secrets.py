"""Credentials in an inbox, remote or server URL never reach a log line or a written file."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellpipe import logs
from cellpipe.errors import CellpipeError
from cellpipe.redact import RedactingFilter, redact_url
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier, write_smear

SECRETS = ("s3cr3t-pass", "hunter2-token")
MODEL = ModelKey("colour_rules", "1")
PARAMS = ScoreParams(cells=CellFinderParams(cell_diameter=40))


@pytest.fixture
def http_inbox(tmp_path: Path) -> Iterator[str]:
    """A folder of slides served over HTTP on 127.0.0.1, as an fsspec http:// inbox."""
    folder = tmp_path / "served" / "inbox"
    folder.mkdir(parents=True)
    for index in range(2):
        write_smear(folder / f"slide_{index}.png", seed=index)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/inbox/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass


def _with_credentials(url: str) -> str:
    """User info in the URL (fsspec's HTTP listing takes no query string on a folder)."""
    return url.replace("http://", f"http://lab-user:{SECRETS[0]}@")


def _files_holding_secrets(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file()
            and any(secret.encode() in path.read_bytes() for secret in SECRETS)]


def test_an_inbox_url_with_credentials_is_scored_and_stored_redacted(
        http_inbox: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "results"
    caplog.set_level(logging.DEBUG)  # fsspec logs every URL it requests at DEBUG
    caplog.handler.addFilter(RedactingFilter())  # as configure_logging does on its handlers
    report = score_inbox(_with_credentials(http_inbox), out, ColourRuleClassifier(), PARAMS,
                         MODEL)
    assert report["totals"] == {"scored": 2, "skipped": 0, "quarantined": 1, "ignored": 0}
    assert report["inbox"].startswith("http://***@127.0.0.1:")
    assert _files_holding_secrets(out) == []
    assert not any(secret in caplog.text for secret in SECRETS)


def test_an_unreachable_inbox_url_is_a_clear_error_without_its_credentials() -> None:
    with pytest.raises(CellpipeError, match=r"cannot list the inbox http://\*\*\*@127\.0\.0\.1:9/"
                       ) as raised:
        score_inbox(f"http://lab-user:{SECRETS[0]}@127.0.0.1:9/inbox/?token={SECRETS[1]}",
                    Path("unused"), ColourRuleClassifier(), PARAMS, MODEL)
    assert not any(secret in str(raised.value) for secret in SECRETS)


def test_log_lines_and_tracebacks_are_redacted_by_the_cli_handlers(
        capsys: pytest.CaptureFixture) -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        logs.configure_logging()  # what cellpipe and python -m flows do first
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
        url = f"s3://key:{SECRETS[0]}@bucket/inbox?X-Amz-Signature={SECRETS[1]}"
        logging.getLogger("fsspec").warning("listing %s", url)
        try:
            raise OSError(f"cannot reach {url}")
        except OSError:
            logging.getLogger("aiohttp").exception("request failed")
    finally:
        root.removeHandler(handler)
    printed = capsys.readouterr().err
    assert "listing s3://***@bucket/inbox?X-Amz-Signature=***" in printed
    assert "OSError: cannot reach s3://***@bucket" in printed
    assert not any(secret in printed for secret in SECRETS)


@pytest.mark.parametrize(("url", "expected"), [
    ("/data/inbox", "/data/inbox"),
    ("s3://bucket/inbox", "s3://bucket/inbox"),
    ("http://user:pw@host:8000/a?sig=x&b=", "http://***@host:8000/a?sig=***&b=***"),
    ("127.0.0.1:8001", "127.0.0.1:8001"),
])
def test_redact_url_keeps_locations_and_hides_credentials(url: str, expected: str) -> None:
    assert redact_url(url) == expected
