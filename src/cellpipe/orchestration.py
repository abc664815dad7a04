"""Prefect plumbing the flows share: offline settings, a local server, one DVC at a time.

Flows (top-level ``flows/``) orchestrate; this module only starts things and keeps them
apart. Prefect's ephemeral mode runs flows but cannot fire schedules, so
``cellpipe flows serve`` starts a real ``prefect server`` on 127.0.0.1 (DESIGN.md), with
its dashboard (the UI ships inside the prefect wheel and runs offline). Ephemeral runs
keep the UI off: nobody could open it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cellpipe.errors import CellpipeError

log = logging.getLogger(__name__)

# Offline and quiet; a project-local home keeps Prefect's SQLite beside the project.
OFFLINE_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DVC_NO_ANALYTICS": "1",
}


def prefect_environment(home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment variables for Prefect processes of this project."""
    settings = {**OFFLINE_SETTINGS, "PREFECT_HOME": str(home.resolve())}
    if api_url:
        settings["PREFECT_API_URL"] = api_url
    return settings


def apply_prefect_environment(home: Path, api_url: str | None = None) -> None:
    """Set :func:`prefect_environment` in this process (before Prefect is imported).

    The home and API URL given here win over the caller's environment: a stray
    PREFECT_API_URL must not send this project's runs to another server.
    """
    for key, value in prefect_environment(home, api_url).items():
        os.environ[key] = value


def dashboard_environment(home: Path, api_url: str) -> dict[str, str]:
    """Settings of a server that serves the dashboard: the UI on, asking ``api_url``.

    Without ``PREFECT_UI_API_URL`` matching the port the UI shows "Can't connect to
    Server API". The UI's files are unpacked under ``home`` (site-packages may be
    read-only in an image), and it shows no promotional content (nothing to fetch).
    The dashboard opens in Prefect's V1 UI: the V2 UI (prefect 3.8.8) starts its Amplitude
    analytics client, which fetches a remote configuration, even with analytics off.
    """
    return {"PREFECT_SERVER_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": api_url,
            "PREFECT_UI_STATIC_DIRECTORY": str((home / "ui").resolve()),
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PREFECT_SERVER_UI_V2_ENABLED": "false"}


class PrefectServer:
    """A ``prefect server start`` on 127.0.0.1, as a child process, with its dashboard
    at :attr:`dashboard_url` unless ``ui`` is false."""

    def __init__(self, home: Path, port: int, *, scheduler_loop_s: float | None = None,
                 ui: bool = True) -> None:
        self.home, self.port, self.ui = home, port, ui
        self.dashboard_url = f"http://127.0.0.1:{port}"
        self.api_url = f"{self.dashboard_url}/api"
        self._scheduler_loop_s = scheduler_loop_s
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **prefect_environment(self.home)}
        env.pop("PREFECT_API_URL", None)  # the server must not look for itself
        if self.ui:
            env.update(dashboard_environment(self.home, self.api_url))
        if self._scheduler_loop_s is not None:
            env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = str(self._scheduler_loop_s)
        command = [str(Path(sys.executable).with_name("prefect")), "server", "start",
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--ui" if self.ui else "--no-ui", "--analytics-off"]
        log_file = (self.home / "server.log").open("ab")
        # Same process group as its owner: stopping the owner's group stops the server.
        self._process = subprocess.Popen(command, env=env, stdout=log_file,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise CellpipeError(f"prefect server exited with code {self._process.returncode}"
                                    f"; see {self.home / 'server.log'}")
            if self.healthy():
                log.info("Prefect server ready at %s", self.api_url)
                if self.ui:
                    log.info("Prefect dashboard at %s", self.dashboard_url)
                return self
            time.sleep(0.5)
        self.stop()
        raise CellpipeError(f"prefect server not healthy after {timeout_s:.0f} s; "
                            f"see {self.home / 'server.log'}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextmanager
def repo_lock(repo: Path) -> Iterator[None]:
    """Hold the repository's DVC lock: one ``dvc`` command per repository at a time.

    DVC has its own lock but fails at once when it is taken; this one waits, so two
    scheduled runs queue instead of one of them failing.
    """
    lock_dir = repo / ".cellpipe"
    lock_dir.mkdir(exist_ok=True)
    with (lock_dir / "dvc.lock").open("w") as handle:
        log.info("waiting for the DVC lock of %s", repo)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_dvc(repo: Path, *args: str) -> str:
    """Run ``dvc <args>`` in ``repo`` with the venv's tools first on PATH; return its output."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    with repo_lock(repo):
        result = subprocess.run([str(Path(bin_dir) / "dvc"), *args], cwd=repo, env=env,
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise CellpipeError(f"dvc {' '.join(args)} failed ({result.returncode}):\n"
                            f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout
