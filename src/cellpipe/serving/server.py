"""A local Triton: the real ``tritonserver`` binary bundled in the nvidia-pytriton wheel.

It is bound to 127.0.0.1, runs with explicit model control, and leaves a state
file (pid, ports, repository) so that ``cellpipe triton stop|status`` and
``cellpipe publish`` find it from another process. That build ships no native
onnxruntime backend; :func:`prepare_backends` gives it a Python-based backend of
that name, so the published repository loads unchanged here and in NVIDIA's
container (DESIGN.md, "Triton from nvidia-pytriton").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from cellpipe.errors import CellpipeError
from cellpipe.fsutil import write_json

log = logging.getLogger(__name__)

STATE_SUBDIR = Path(".cellpipe/triton")
# What marks a cellpipe project's root: its pipeline, or the state of a server it started.
_PROJECT_MARKERS = ("dvc.yaml", ".cellpipe")
HOST = "127.0.0.1"


class ServerError(CellpipeError):
    """The local Triton could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServerInfo:
    """A running local server, as recorded in its state file."""

    pid: int
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: str
    log_file: str
    host: str = HOST  # the address it listens on

    @property
    def http_url(self) -> str:
        return f"{self._reachable_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._reachable_host}:{self.grpc_port}"

    @property
    def _reachable_host(self) -> str:
        """Where a client on this machine reaches it: every address includes loopback."""
        return HOST if self.host in ("0.0.0.0", "::") else self.host

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def pytriton_root() -> Path:
    """Folder of the server bundled in the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as error:
        raise ServerError("nvidia-pytriton is not installed; it provides the local "
                          "tritonserver (`make venv` installs it)") from error
    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backends(target: Path) -> Path:
    """Build ``target`` as a backend directory: the Python backend and our onnxruntime one.

    Real copies, not symlinks: the Python backend locates its stub and utilities
    next to the resolved library path.
    """
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (root / "backends/python/libtriton_python.so",
                   root / "backends/python/triton_python_backend_utils.py", stub):
        shutil.copy2(source, python_dir / source.name)
    onnx_dir = target / "onnxruntime"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    backend = resources.files("cellpipe.serving.triton_python") / "onnxruntime_backend.py"
    (onnx_dir / "model.py").write_text(backend.read_text())
    return target


def default_state_dir(start: Path | None = None) -> Path:
    """``.cellpipe/triton`` of the project that holds ``start`` (default: the current folder).

    The project is the nearest folder upwards with a ``dvc.yaml`` or a ``.cellpipe``, so a
    command run from a subfolder finds the server that ``cellpipe triton start`` started
    at the root; outside any project it is the current folder's.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in _PROJECT_MARKERS):
            return folder / STATE_SUBDIR
    return here / STATE_SUBDIR


class LocalTriton:
    """Start, find and stop the local server whose state lives in ``state_dir``."""

    def __init__(self, state_dir: Path | None = None) -> None:
        state_dir = (state_dir or default_state_dir()).resolve()
        self.state_dir = state_dir
        self.state_file = state_dir / "server.json"
        self._process: subprocess.Popen | None = None

    def start(self, repository: Path, *, http_port: int = 8000, grpc_port: int = 8001,
              metrics_port: int = 8002, timeout_s: float = 120.0,
              host: str = HOST) -> ServerInfo:
        """Start the server with every model of ``repository`` loaded; wait until it is ready.

        It listens on ``host``: loopback by default, so that nothing outside this machine
        reaches it; a container serving other containers passes ``0.0.0.0``.
        """
        running = self.running()
        if running is not None:
            raise ServerError(f"a local Triton already runs (pid {running.pid}, HTTP "
                              f"{running.http_url}); `cellpipe triton stop` first")
        if not repository.is_dir():
            raise ServerError(f"no model repository at {repository}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.state_dir / "backends")
        log_file = self.state_dir / "server.log"
        command = [
            str(pytriton_root() / "bin/tritonserver"),
            f"--model-repository={repository.resolve()}",
            f"--backend-directory={backends.resolve()}",
            f"--cache-directory={pytriton_root() / 'caches'}",
            f"--http-address={host}", f"--http-port={http_port}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}",
            f"--metrics-address={host}", f"--metrics-port={metrics_port}",
            "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
            "--model-control-mode=explicit", "--load-model=*",
            # One broken model must not take the others down; readiness is the server's.
            "--exit-on-error=false", "--strict-readiness=false",
            # Idle keep-alive client connections would otherwise hold a stop for 30 s.
            "--exit-timeout-secs=10",
        ]
        with log_file.open("ab") as log_handle:
            process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT,
                                       env=_server_environment(), start_new_session=True)
        self._process = process
        info = ServerInfo(process.pid, http_port, grpc_port, metrics_port,
                          str(repository.resolve()), str(log_file.resolve()), host)
        try:
            self._wait_ready(info, process, timeout_s)
        except ServerError:
            self._terminate(process.pid, timeout_s=10)
            raise
        write_json(self.state_file, asdict(info))
        log.info("Triton ready: HTTP %s, gRPC %s (pid %d, log %s)", info.http_url,
                 info.grpc_url, info.pid, log_file)
        return info

    def running(self) -> ServerInfo | None:
        """The server recorded in the state file, if that process still runs."""
        if not self.state_file.is_file():
            return None
        info = ServerInfo(**json.loads(self.state_file.read_text()))
        if not _is_tritonserver(info.pid):
            self.state_file.unlink(missing_ok=True)  # stale: the process is gone
            return None
        return info

    def stop(self, *, timeout_s: float = 30.0) -> bool:
        """Stop the recorded server (SIGTERM, then SIGKILL); False if none was running."""
        info = self.running()
        if info is None:
            return False
        self._terminate(info.pid, timeout_s=timeout_s)
        self.state_file.unlink(missing_ok=True)
        log.info("Triton stopped (pid %d)", info.pid)
        return True

    def _wait_ready(self, info: ServerInfo, process: subprocess.Popen, timeout_s: float) -> None:
        import tritonclient.http as http

        client = http.InferenceServerClient(info.http_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {process.returncode}; "
                                  f"last log lines:\n{_tail(Path(info.log_file))}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # connection refused until the HTTP endpoint is up
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s; last log lines:\n"
                          f"{_tail(Path(info.log_file))}")

    def _terminate(self, pid: int, *, timeout_s: float) -> None:
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if self._process is not None and self._process.pid == pid:
                    if self._process.poll() is not None:  # reaps our own child
                        return
                elif not _is_tritonserver(pid):
                    return
                time.sleep(0.1)
        raise ServerError(f"tritonserver (pid {pid}) did not stop")


def local_model_card(model_name: str, version: str, *, url: str | None = None,
                     state_dir: Path | None = None) -> dict | None:
    """The published card of ``model_name`` version ``version``, when the server scoring
    with it is the local one (``url`` None or one of its addresses), whose repository is
    on this disk; None otherwise (a remote server's cards are not reachable)."""
    info = LocalTriton(state_dir).running()
    if info is None or (url is not None and url not in (info.grpc_url, info.http_url)):
        return None
    card_file = Path(info.repository) / model_name / str(version) / "card.json"
    try:
        return json.loads(card_file.read_text())
    except (OSError, ValueError):
        log.debug("no readable model card at %s", card_file)
        return None


def _server_environment() -> dict[str, str]:
    """PATH and LD_LIBRARY_PATH that let the bundled server and its Python stub start."""
    env = dict(os.environ)
    libraries = [str(pytriton_root().parent.parent / "nvidia_pytriton.libs"),
                 str(sysconfig.get_config_var("LIBDIR"))]
    if env.get("LD_LIBRARY_PATH"):
        libraries.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
    # The stub runs Python isolated and finds site-packages through `python3` on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _is_tritonserver(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) tritonserver process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and b"tritonserver" in cmdline


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
