"""The cellpipe command line: help for every stage, user errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cellpipe.cli import build_parser, main


def test_help_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ingest" in out and "preprocess" in out


def test_missing_source_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("ingest: {}\n")
    code = main(["ingest", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "out"),
                 "--params", str(params)])
    assert code == 1
    assert "source folder not found" in caplog.text


def test_invalid_params_name_the_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  layot: voc\n")
    code = main(["ingest", "--source", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--params", str(params)])
    assert code == 1
    assert "layot" in caplog.text and "Extra inputs are not permitted" in caplog.text


def test_module_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "cellpipe", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith("cellpipe ")
