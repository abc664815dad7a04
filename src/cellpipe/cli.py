"""The ``cellpipe`` command line: one subcommand per pipeline stage, then the serving side.

The stage subcommands are a loop over the stage modules' common face (see
:mod:`cellpipe.stages.options`): paths come from the command line (dvc.yaml owns them),
tunables from the stage's own section of params.yaml. A stage module is imported only
when its command runs, so ``cellpipe score`` works where PyTorch is not installed.
Errors meant for the user are printed without a traceback; ``--verbose`` adds debug
logging.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from cellpipe import __version__
from cellpipe.commands import score, triton, tune
from cellpipe.commands.score import EXIT_QUARANTINED  # noqa: F401 (part of the CLI's interface)
from cellpipe.errors import CellpipeError, InputError, Interrupted
from cellpipe.logs import configure_logging
from cellpipe.params import DEFAULT_PARAMS_FILE, load_section

log = logging.getLogger("cellpipe")

STAGES = ("ingest", "preprocess", "augment", "train", "evaluate", "export", "publish")
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool cut off by `head`


def stage_module(name: str) -> ModuleType:
    """``cellpipe.stages.<name>``: its SECTION, Params, add_arguments, core function, run."""
    return importlib.import_module(f"cellpipe.stages.{name}")


def _stage_docstring(name: str) -> str:
    """The stage module's docstring, read without importing it (no PyTorch for --help)."""
    spec = importlib.util.find_spec(f"cellpipe.stages.{name}")
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or name


def _run_stage(args: argparse.Namespace) -> None:
    """Load the stage's params section and call its ``run`` with the parsed options."""
    stage = stage_module(args.stage)
    params = load_section(stage.Params, stage.SECTION, args.params)
    options = [name for name in inspect.signature(stage.run).parameters if name != "params"]
    stage.run(params=params, **{name: getattr(args, name) for name in options})


def _add_stage(commands: argparse._SubParsersAction, name: str, *, full: bool) -> None:
    """A stage's subcommand; its options (which import the stage) only when ``full``."""
    docstring = _stage_docstring(name)
    summary = docstring.splitlines()[0].split(": ", 1)[-1]
    command = commands.add_parser(name, help=summary[0].upper() + summary[1:],
                                  description=docstring, add_help=full,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.set_defaults(handler=_run_stage, stage=name)
    if full:
        command.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE,
                             help="params file (default: %(default)s)")
        stage_module(name).add_arguments(command)


def _backbones(args: argparse.Namespace) -> None:
    from cellpipe.nets.registry import describe_backbones

    for name, summary in describe_backbones():
        print(f"{name:20s} {summary}")


def _flows(arguments: Sequence[str]) -> int:
    """Hand over to the flows' own entry point, ``python -m flows``, in the repository.

    The flows are the application above this library (top-level ``flows/``), so the
    library never imports them: it starts them as a program, and passes SIGTERM on.
    """
    repo = argparse.ArgumentParser(add_help=False)
    repo.add_argument("--repo", type=Path, default=Path("."))
    found = repo.parse_known_args(arguments)[0].repo.resolve()
    if not (found / "flows" / "__main__.py").is_file():
        raise InputError(f"{found} holds no flows/ package (use --repo)")
    path = os.pathsep.join(filter(None, [str(found), os.environ.get("PYTHONPATH")]))
    child = subprocess.Popen([sys.executable, "-m", "flows", *arguments],
                             env={**os.environ, "PYTHONPATH": path})
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        return child.wait()


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``stage`` is the one stage whose options are built."""
    parser = argparse.ArgumentParser(
        prog="cellpipe",
        description="Batch system for microscopy cell images. Each stage subcommand is one "
                    "DVC stage; `dvc repro` runs them in order (see dvc.yaml).",
    )
    parser.add_argument("--version", action="version", version=f"cellpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        _add_stage(commands, name, full=name == stage)
    triton.add_commands(commands)
    score.add_commands(commands)
    tune.add_commands(commands)
    # Listed for --help; main() hands `flows …` over before parsing (see _flows).
    commands.add_parser("flows", help="Run or schedule the Prefect flows: serve | run FLOW "
                                      "(python -m flows in the repository; --help).")
    commands.add_parser("backbones", help="List the registered backbones.").set_defaults(
        handler=_backbones)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    if command == "flows":
        configure_logging("-v" in argv or "--verbose" in argv)
        handler = lambda: _flows(argv[argv.index("flows") + 1:])  # noqa: E731
    else:
        args = build_parser(command if command in STAGES else None).parse_args(argv)
        configure_logging(args.verbose)
        handler = lambda: args.handler(args)  # noqa: E731
    try:
        return handler() or 0
    except CellpipeError as error:
        log.error("%s", error)
        return 1
    except Interrupted as stop:  # the command has saved what it could (and said so)
        log.error("%s", stop)
        return 128 + stop.signum
    except BrokenPipeError:
        # The reader went away (`cellpipe … | head`): stop quietly, as Unix tools do, and
        # point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
