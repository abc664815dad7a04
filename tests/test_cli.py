"""The cellpipe command line: help for every stage, user errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cellpipe.cli import STAGES, build_parser, main, stage_module
from cellpipe.params import StageParams

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    commands = {line.split()[0] for line in out.split("COMMAND\n", 1)[1].splitlines()
                if line.startswith("    ") and not line.startswith("     ")}
    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stages <= commands, f"stages without a command: {sorted(stages - commands)}"


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_has_the_same_face(name: str) -> None:
    """SECTION, Params, add_arguments, a core function named after the stage, and run(),
    whose every parameter but params is an option that add_arguments defines."""
    import argparse
    import inspect

    stage = stage_module(name)
    assert name == stage.SECTION
    assert issubclass(stage.Params, StageParams)
    assert callable(getattr(stage, name)) and callable(stage.run)
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    options = {action.dest for action in parser._actions} - {"help"}
    wanted = set(inspect.signature(stage.run).parameters) - {"params"}
    assert wanted == options, f"run() parameters {sorted(wanted)} != options {sorted(options)}"


def test_every_dvc_stage_is_a_cli_stage() -> None:
    assert list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == list(STAGES)


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


def test_clients_default_to_the_model_name_publish_gives(tmp_path: Path) -> None:
    """publish.model_name is the one place that names the served model."""
    from cellpipe.commands.servers import model_name as _model_name
    from cellpipe.serving.triton_config import DEFAULT_MODEL_NAME, published_model_name

    params = tmp_path / "params.yaml"
    params.write_text("publish:\n  model_name: wbc_subtypes\n  max_batch_size: 8\n")
    assert published_model_name(params) == "wbc_subtypes"
    assert published_model_name(tmp_path / "missing.yaml") == DEFAULT_MODEL_NAME
    score = build_parser().parse_args(["score", "inbox", "--out", "o", "--params", str(params)])
    assert _model_name(score) == "wbc_subtypes"
    chosen = build_parser().parse_args(["score", "inbox", "--out", "o", "--params", str(params),
                                        "--model-name", "other"])
    assert _model_name(chosen) == "other"
