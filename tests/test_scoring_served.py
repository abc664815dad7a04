"""Slides scored through a real local Triton: the CLI batch and a scheduled Prefect run.

Reuses the serving tests' small colour model (red/green/blue at 16 px) and server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cellpipe.cli import EXIT_QUARANTINED
from cellpipe.cli import main as cli_main
from cellpipe.serving.server import ServerInfo, free_port
from test_serving import exported, server, trained  # noqa: F401 (module fixtures)

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 230)}


def _striped_slide(path: Path, seed: int) -> None:
    """Three vertical bands, red | green | blue, of 2 × 4 tiles of 32 px each."""
    rng = np.random.default_rng(seed)
    bands = [np.clip(np.array(c, np.int16) + rng.integers(-40, 40, (128, 64, 3)), 0, 255)
             for c in COLOURS.values()]
    Image.fromarray(np.concatenate(bands, axis=1).astype(np.uint8)).save(path)


def _setup(root: Path) -> tuple[Path, Path, Path]:
    inbox = root / "inbox"
    inbox.mkdir()
    for index in range(2):
        _striped_slide(inbox / f"slide_{index}.png", index)
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = root / "results"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["score"].update(mode="tiles", tiles={"size": 32, "min_tissue": 0.0})
    params["flows"].update(inbox=str(inbox), results=str(out))
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    return inbox, out, params_file


def _check_results(out: Path) -> None:
    table = pd.read_csv(out / "summary.csv")
    assert sorted(table["slide"]) == ["slide_0.png", "slide_1.png"]
    assert (table[["n_red", "n_green", "n_blue"]] == 8).all().all()  # each band: 8 tiles
    report = json.loads((out / "report.json").read_text())
    quarantined = [s["slide"] for s in report["slides"] if s["status"] == "quarantined"]
    assert quarantined == ["broken.png"]
    assert (out / "report.html").is_file()  # the page beside report.json, CLI and flow alike
    assert all((out / result / "objects.geojson").is_file() for result in table["result"])


def test_cli_scores_an_inbox_through_triton(server: tuple[ServerInfo, Path],  # noqa: F811
                                            tmp_path: Path) -> None:
    info, repository = server
    inbox, out, params_file = _setup(tmp_path)
    arguments = ["score", str(inbox), "--out", str(out), "--url", info.grpc_url,
                 "--params", str(params_file), "--state-dir", str(repository.parent / "state")]
    assert cli_main(arguments) == 0
    _check_results(out)
    assert "Validation macro f1" in (out / "report.html").read_text()  # the served card
    summary = json.loads(next((out / "slides").glob("slide_0-*/summary.json")).read_text())
    assert summary["model"] == {"name": "cell_classifier", "version": "1"}
    assert cli_main(arguments) == 0  # a rerun skips both slides
    assert json.loads((out / "report.json").read_text())["totals"]["skipped"] == 2
    # --strict: the same batch, but broken.png is still quarantined, so the exit says so.
    assert cli_main([*arguments, "--strict"]) == EXIT_QUARANTINED
    (inbox / "broken.png").unlink()
    assert cli_main([*arguments, "--strict"]) == 0


@pytest.mark.slow
def test_a_scheduled_deployment_fires_a_real_run_on_a_local_prefect_server(
        server: tuple[ServerInfo, Path], tmp_path: Path) -> None:  # noqa: F811
    info, _ = server
    _, out, params_file = _setup(tmp_path)
    port = free_port()
    env = {**os.environ, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    command = [sys.executable, "-m", "cellpipe", "flows", "serve", "--repo", str(REPO),
               "--home", str(tmp_path / "prefect"),
               "--params", str(params_file), "--port", str(port), "--only", "scoring",
               "--interval", "5", "--url", info.grpc_url]
    serving = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run = _wait_for_completed_run(f"http://127.0.0.1:{port}/api", serving, timeout_s=240)
        assert run["deployment_id"] is not None  # fired by the schedule, not called directly
        _check_results(out)
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        try:
            serving.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()
    assert f"Prefect dashboard: http://127.0.0.1:{port}" in serving.stdout.read()


def _wait_for_completed_run(api: str, serving: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serving.poll() is not None:
            pytest.fail(f"`cellpipe flows serve` exited:\n{serving.stdout.read()[-4000:]}")
        try:
            runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=5).json()
        except (httpx.HTTPError, ValueError):
            runs = []
        for run in runs if isinstance(runs, list) else []:
            if run.get("state_type") == "COMPLETED":
                return run
            if run.get("state_type") in ("FAILED", "CRASHED"):
                pytest.fail(f"the scheduled run ended {run['state_type']}: "
                            f"{run.get('state', {}).get('message')}")
        time.sleep(1)
    serving.send_signal(signal.SIGTERM)
    pytest.fail(f"no completed run within {timeout_s:.0f} s:\n{serving.stdout.read()[-4000:]}")


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """A real Dask scheduler and two worker processes on 127.0.0.1; yields its address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    dask = [sys.executable, "-m", "distributed.cli"]
    processes = [subprocess.Popen(
        [*dask[:2], "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", ":0", "--no-show"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        _wait_for_port(port, processes[0])
        processes += [subprocess.Popen(
            [*dask[:2], "distributed.cli.dask_worker", address, "--host", "127.0.0.1",
             "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--name", f"w{index}"],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True) for index in range(2)]
        _wait_for_workers(address, 2)
        yield address
    finally:
        for process in reversed(processes):
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the Dask scheduler exited"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"no Dask scheduler on port {port} within {timeout_s:.0f} s")


def _wait_for_workers(address: str, count: int, timeout_s: float = 90) -> None:
    from distributed import Client

    with Client(address, timeout=timeout_s) as client:
        client.wait_for_workers(count, timeout=timeout_s)


@pytest.mark.slow
def test_scoring_on_a_running_dask_cluster_equals_the_thread_run(
        server: tuple[ServerInfo, Path], dask_cluster: str, tmp_path: Path,  # noqa: F811
        ) -> None:
    """`cellpipe flows run scoring --dask-address` sends the slides to the cluster's workers."""
    from distributed import Client

    info, _ = server
    inbox, out, params_file = _setup(tmp_path)
    # In processes of their own, as a user runs them: each stops its ephemeral Prefect server.
    common = [sys.executable, "-m", "cellpipe", "flows", "run", "scoring", "--repo", str(REPO),
              "--home", str(tmp_path / "prefect"), "--params", str(params_file),
              "--url", info.grpc_url, "--inbox", str(inbox)]
    for extra in (["--out", str(tmp_path / "threads")],
                  ["--out", str(out), "--dask-address", dask_cluster]):
        run = subprocess.run([*common, *extra], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
    _check_results(out)

    # The scheduler ran one score_one task per inbox file on its workers.
    with Client(dask_cluster) as client:
        finished = client.run_on_scheduler(
            lambda dask_scheduler: {name: prefix.state_counts["memory"]
                                    for name, prefix in dask_scheduler.task_prefixes.items()})
    assert finished == {"score_one": len(list(inbox.iterdir()))}
    on_dask = _slide_results(out)
    assert on_dask == _slide_results(tmp_path / "threads") and len(on_dask) == 2


def _slide_results(out: Path) -> dict[str, tuple[dict, list]]:
    """Counts and every object row per slide, for a slide-by-slide comparison."""
    results = {}
    for summary_file in sorted((out / "slides").glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        objects = pd.read_parquet(summary_file.parent / "objects.parquet")
        rows = objects.drop(columns=[c for c in objects if "time" in c]).round(6)
        results[summary["slide"]] = (summary["counts"], rows.to_dict("records"))
    return results
