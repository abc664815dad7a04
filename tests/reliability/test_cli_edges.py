"""The CLI at the edges: a closed pipe, a command run away from the project root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cellpipe.cli import EXIT_BROKEN_PIPE
from cellpipe.serving.server import LocalTriton, default_state_dir


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`cellpipe … | head` once head has gone: no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes a line
    try:
        run = subprocess.run([sys.executable, "-m", "cellpipe", "backbones"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == EXIT_BROKEN_PIPE


def test_the_local_server_is_found_from_a_subfolder_of_the_project(tmp_path: Path) -> None:
    project = tmp_path / "lab"
    (project / "notebooks" / "deep").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    expected = project / ".cellpipe" / "triton"
    assert default_state_dir(project / "notebooks" / "deep") == expected
    assert default_state_dir(project) == expected
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert default_state_dir(outside) == outside / ".cellpipe" / "triton"


def test_without_a_server_the_cli_says_where_it_looked(tmp_path: Path) -> None:
    project = tmp_path / "lab"
    (project / "sub").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    run = subprocess.run([sys.executable, "-m", "cellpipe", "triton", "status"],
                         cwd=project / "sub", capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"looked for {project / '.cellpipe' / 'triton' / 'server.json'}" in run.stderr
    assert LocalTriton(project / ".cellpipe" / "triton").running() is None
