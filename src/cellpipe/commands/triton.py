"""``cellpipe triton start|stop|status|classify|verify``: a local Triton, and scoring on any."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from cellpipe.commands.servers import (
    ServerUnreachable,
    add_server_options,
    model_name,
    server_url,
)
from cellpipe.errors import CellpipeError, InputError

log = logging.getLogger(__name__)


def start(args: argparse.Namespace) -> None:
    from cellpipe.serving.server import LocalTriton

    info = LocalTriton(args.state_dir).start(
        args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, timeout_s=args.timeout, host=args.host)
    print(f"Triton ready: HTTP {info.http_url}, gRPC {info.grpc_url} (pid {info.pid}, "
          f"log {info.log_file})")


def stop(args: argparse.Namespace) -> None:
    from cellpipe.serving.server import LocalTriton

    stopped = LocalTriton(args.state_dir).stop()
    print("Triton stopped" if stopped else "no local Triton was running")


def status(args: argparse.Namespace) -> None:
    import tritonclient.http as httpclient

    url = server_url(args, "http")
    client = httpclient.InferenceServerClient(url)
    try:
        ready = client.is_server_ready()
        models = client.get_model_repository_index()
    except Exception as error:  # connection refused and friends: say so plainly
        raise ServerUnreachable(f"no Triton answers at {url}: {error}") from error
    finally:
        client.close()
    print(f"Triton at {url}: {'ready' if ready else 'NOT ready'}")
    for model in models:
        reason = f" ({model['reason']})" if model.get("reason") else ""
        print(f"  {model['name']:32s} v{model.get('version', '-'):4s} {model.get('state', '-')}"
              f"{reason}")


def classify(args: argparse.Namespace) -> None:
    from cellpipe.serving.client import TritonClassifier

    readable, rejected = [], []
    for path in args.files:
        try:
            readable.append((path, path.read_bytes()))
        except OSError as error:
            rejected.append((path, f"cannot read file: {error.strerror or error}"))
    with TritonClassifier(server_url(args, args.protocol), protocol=args.protocol,
                          model_name=model_name(args)) as client:
        names = client.contract.class_names
        try:
            scored = list(zip(readable, client.classify_encoded([b for _, b in readable]),
                              strict=True))
        except CellpipeError:
            # One undecodable file fails its whole request: score file by file to keep the rest.
            scored = []
            for item in readable:
                try:
                    scored.append((item, client.classify_encoded([item[1]])[0]))
                except CellpipeError as error:
                    rejected.append((item[0], str(error)))
    for (path, _), row in scored:
        print(f"{path}\t{names[int(row.argmax())]}\t{row.max():.4f}")
    for path, reason in rejected:
        log.error("rejected %s: %s", path, reason)
    if rejected:
        raise InputError(f"{len(rejected)} of {len(args.files)} files could not be classified")


def verify(args: argparse.Namespace) -> None:
    from cellpipe.serving.verify import verify_server

    for protocol in ("grpc", "http") if args.protocol == "both" else (args.protocol,):
        result = verify_server(args.onnx, args.shards, args.split, server_url(args, protocol),
                               protocol, model_name=model_name(args), limit=args.limit)
        print(f"{protocol}: {result['images']} {args.split} images, max |Δp| vs onnxruntime "
              f"in-process: tensors {result['tensor_max_abs_difference']:.1e}, image bytes "
              f"{result['bytes_max_abs_difference']:.1e}; accuracy {result['accuracy']:.4f}, "
              f"macro-F1 {result['macro_f1']:.4f}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``cellpipe triton ACTION``."""
    triton = commands.add_parser(
        "triton", help="Run a local Triton server and score images on any Triton.",
        description="The local server is the tritonserver binary bundled in nvidia-pytriton, "
                    "on 127.0.0.1 with explicit model control. --url points a command at "
                    "another Triton instead.")
    actions = triton.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, handler: Callable[[argparse.Namespace], None],
               summary: str) -> argparse.ArgumentParser:
        command = actions.add_parser(name, help=summary, description=summary)
        command.set_defaults(handler=handler)
        command.add_argument("--state-dir", type=Path, default=None,
                             help="pidfile, ports and log of the local server (default: "
                                  ".cellpipe/triton in the project holding the current folder)")
        return command

    started = action("start", start, "Start the local Triton; wait until ready.")
    started.add_argument("--repo", type=Path, default=Path("triton_repo"),
                         help="model repository (default: %(default)s)")
    for name, port in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        started.add_argument(f"--{name}-port", type=int, default=port,
                             help=f"{name} port (default: %(default)s)")
    started.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default: %(default)s, this machine only; "
                              "0.0.0.0 in a container that serves others)")
    started.add_argument("--timeout", type=float, default=120.0,
                         help="seconds to wait for readiness (default: %(default)s)")
    action("stop", stop, "Stop the local Triton (SIGTERM, then SIGKILL).")
    action("status", status, "Readiness and model states of a server.").add_argument(
        "--url", help="HTTP host:port (default: the local server)")

    classifying = action("classify", classify,
                         "Classify image files as they are (server-side preprocessing).")
    classifying.add_argument("files", type=Path, nargs="+", help="PNG, JPEG, BMP or TIFF files")
    classifying.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    add_server_options(classifying)
    verifying = action("verify", verify,
                       "Score a shard split on the server and in-process; compare the answers.")
    verifying.add_argument("--onnx", type=Path, default=Path("outputs/export/model.onnx"),
                           help="the published model, run in-process (default: %(default)s)")
    verifying.add_argument("--shards", type=Path, default=Path("outputs/preprocess/shards"),
                           help="preprocess shards (default: %(default)s)")
    verifying.add_argument("--split", default="test", help="split to score (default: test)")
    verifying.add_argument("--limit", type=int, help="score only the first N images")
    verifying.add_argument("--protocol", choices=("grpc", "http", "both"), default="both")
    add_server_options(verifying)
