"""Command-line options that several stages share.

Each stage module has the same face: ``SECTION`` (its params.yaml section), ``Params``
(that section's class), ``add_arguments(parser)`` (its options, each named after a
parameter of ``run``), a core function named after the stage, and ``run()``, the stage as
DVC runs it. ``cellpipe.cli`` is a loop over that face.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cellpipe.parallel import default_workers


def add_path(parser: argparse.ArgumentParser, name: str, help: str, *,  # noqa: A002
             required: bool = True) -> None:
    """``--name PATH``; its destination is ``name`` with dashes as underscores."""
    parser.add_argument(f"--{name}", type=Path, required=required, help=help)


def add_workers(parser: argparse.ArgumentParser) -> None:
    """``--workers N``: decoding processes."""
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="decoding processes (default: all cores, %(default)s here)")


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: where PyTorch runs."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
