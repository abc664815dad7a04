"""Which Triton a command talks to, and under which model name."""

from __future__ import annotations

import argparse

from cellpipe.errors import CellpipeError
from cellpipe.params import DEFAULT_PARAMS_FILE


class ServerUnreachable(CellpipeError):
    """No Triton server answers where the command looked for one."""


def model_name(args: argparse.Namespace) -> str:
    """--model-name if given, else publish.model_name of the command's params file."""
    from cellpipe.serving.triton_config import published_model_name

    return args.model_name or published_model_name(getattr(args, "params", None)
                                                   or DEFAULT_PARAMS_FILE)


def server_url(args: argparse.Namespace, protocol: str) -> str:
    """--url if given, else the local server started by `cellpipe triton start`."""
    if args.url:
        return args.url
    from cellpipe.serving.server import LocalTriton

    local = LocalTriton(args.state_dir)
    info = local.running()
    if info is None:
        raise ServerUnreachable(f"no --url was given and no local Triton runs (looked for "
                                f"{local.state_file}; `cellpipe triton start` in the project, "
                                f"or --state-dir)")
    return info.url(protocol)


def add_server_options(command: argparse.ArgumentParser) -> None:
    """--url and --model-name, for commands that score on a server."""
    command.add_argument("--url", help="host:port for --protocol (default: the local server)")
    command.add_argument("--model-name",
                         help="published model name (default: publish.model_name in --params)")
