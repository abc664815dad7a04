"""Serve a mounted model repository in a container with cellpipe's local Triton.

The same code path as ``cellpipe triton start`` (:class:`cellpipe.serving.server.LocalTriton`:
the tritonserver binary bundled in nvidia-pytriton, a backend directory with the Python
backend and cellpipe's Python ``onnxruntime`` backend, the same flags), with two
differences a container needs: the server listens on every interface of the container
(CELLPIPE_TRITON_HOST, default 0.0.0.0) instead of 127.0.0.1, and this process stays in
the foreground, copies the server's log to stdout and stops the server on SIGTERM.

    python3 triton_serve.py [--repo /models] [--http-port 8000] [--grpc-port 8001]
                            [--metrics-port 8002] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from cellpipe.serving import server


def _follow(path: Path, stop: threading.Event) -> None:
    """Copy the server's log file to stdout (container logs) as it grows."""
    while not path.exists() and not stop.is_set():
        time.sleep(0.2)
    with path.open("rb") as handle:
        while not stop.is_set():
            chunk = handle.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(os.environ.get("TRITON_REPO", "/models")))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--state-dir", type=Path, default=Path.home() / ".cellpipe" / "triton")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to get ready")
    args = parser.parse_args()

    host = os.environ.get("CELLPIPE_TRITON_HOST", "0.0.0.0")
    triton = server.LocalTriton(args.state_dir)
    triton.state_file.unlink(missing_ok=True)  # a container never inherits a running server
    stopping = threading.Event()
    follower = threading.Thread(target=_follow, args=(args.state_dir / "server.log", stopping),
                                daemon=True)
    follower.start()

    def stop(signum: int, _frame: object) -> None:
        print(f"triton_serve: signal {signum}, stopping the server", flush=True)
        triton.stop()
        stopping.set()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    info = triton.start(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                        metrics_port=args.metrics_port, timeout_s=args.timeout, host=host)
    print(f"triton_serve: ready on {host}: HTTP {info.http_port}, gRPC {info.grpc_port}, "
          f"metrics {info.metrics_port} (pid {info.pid})", flush=True)
    while triton.running() is not None:  # exits with the server
        time.sleep(1)
    stopping.set()
    print("triton_serve: the server exited", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
