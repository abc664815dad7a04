"""The real DVC pipeline on the bundled demo data, in a copy of this repository."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, require_executable

pytestmark = pytest.mark.slow


def _tracked_copy(destination: Path) -> Path:
    """Copy what a fresh clone would hold (git-tracked and unignored files)."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    for relative in listing:
        source = REPO / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    return destination


def _dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([require_executable("dvc"), *args], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_a_fresh_clone_has_every_stage_output_in_the_bundled_remote(
        tmp_path: Path, dvc_env: dict[str, str]) -> None:
    """`make demo` on a fresh clone pulls the outputs dvc.lock names and retrains nothing,
    so no machine-dependent float lands in a tracked file (a clean `git status`). Fails
    when dvc.lock changed without `dvc push` of its outputs to dvc-remote/."""
    repo = _tracked_copy(tmp_path / "clone")
    _dvc(repo, dvc_env, "pull")
    # Only publish is "changed": it always runs, since DVC cannot see triton_repo's state.
    assert _dvc(repo, dvc_env, "status").split() == ["publish:", "always", "changed"]


def test_pull_repro_status_and_param_change_reruns_only_downstream(
        tmp_path: Path, dvc_env: dict[str, str]) -> None:
    repo = _tracked_copy(tmp_path / "clone")

    _dvc(repo, dvc_env, "pull", "data.dvc")  # offline, from the remote inside the repo
    assert len(list((repo / "data" / "bccd" / "JPEGImages").glob("*.jpg"))) == 364
    assert (repo / "data" / "bccd" / "LICENSE").read_text().startswith("MIT License")

    first = _dvc(repo, dvc_env, "repro")
    assert "Running stage 'ingest'" in first and "Running stage 'preprocess'" in first
    # Only publish is "changed": it always runs, since DVC cannot see triton_repo's state.
    assert _dvc(repo, dvc_env, "status").split() == ["publish:", "always", "changed"]
    metrics = json.loads((repo / "outputs" / "ingest" / "metrics.json").read_text())
    assert metrics["classes"] == {"RBC": 4153, "WBC": 372, "Platelets": 361}
    assert metrics["rejected"] == 2  # the two zero-area boxes in BCCD's annotations
    evaluation = json.loads((repo / "outputs" / "evaluate" / "metrics.json").read_text())
    assert evaluation["images"] == 945 and evaluation["accuracy"] > 0.9
    assert (repo / "models" / "classifier" / "model.pt").is_file()
    assert json.loads((repo / "models" / "classifier" / "calibration.json").read_text())[
        "temperature"] > 0

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["preprocess"]["image_size"] = 32
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = _dvc(repo, dvc_env, "repro", "preprocess")
    assert "Stage 'ingest' didn't change, skipping" in second
    assert "Running stage 'preprocess'" in second
    assert "Running stage 'train'" not in second
    meta = json.loads((repo / "outputs" / "preprocess" / "shards" / "meta.json").read_text())
    assert meta["image_size"] == 32
    # Downstream of preprocess, train and evaluate are now stale; ingest is not.
    status = _dvc(repo, dvc_env, "status")
    assert "train:" in status and "evaluate:" in status and "ingest:" not in status
