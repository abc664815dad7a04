"""The ``cellpipe`` command line: one subcommand per pipeline stage.

Paths come from the command line (dvc.yaml owns them); tunables come from one
section of params.yaml each. Errors meant for the user are printed without a
traceback; ``--verbose`` adds debug logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cellpipe import __version__
from cellpipe.errors import CellpipeError
from cellpipe.parallel import default_workers
from cellpipe.params import DEFAULT_PARAMS_FILE, load_section

log = logging.getLogger("cellpipe")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from cellpipe.stages import ingest

    params = load_section(ingest.IngestParams, "ingest", args.params)
    ingest.run(args.source, args.out, params, workers=args.workers)


def _cmd_preprocess(args: argparse.Namespace) -> None:
    from cellpipe.stages import preprocess

    params = load_section(preprocess.PreprocessParams, "preprocess", args.params)
    preprocess.run(args.manifest, args.source, args.out, params, workers=args.workers)


def _cmd_train(args: argparse.Namespace) -> None:
    from cellpipe.stages import train

    params = load_section(train.TrainParams, "train", args.params)
    train.run(args.shards, args.manifest, args.out, args.model, params, device=args.device)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from cellpipe.stages import evaluate

    params = load_section(evaluate.EvaluateParams, "evaluate", args.params)
    args.out.mkdir(parents=True, exist_ok=True)
    evaluate.evaluate(args.model, args.shards, args.out, args.calibration, params,
                      device=args.device)


def _cmd_backbones(args: argparse.Namespace) -> None:
    from cellpipe.nets.registry import describe_backbones

    for name, summary in describe_backbones():
        print(f"{name:20s} {summary}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellpipe",
        description="Batch system for microscopy cell images. Each subcommand is one DVC "
                    "stage; `dvc repro` runs them in order (see dvc.yaml).",
    )
    parser.add_argument("--version", action="version", version=f"cellpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = _add_command(
        commands, "ingest", _cmd_ingest,
        "Scan a source folder into the manifest (+ rejected list, duplicates, metrics).",
        "Reads class folders (optionally under TRAIN/TEST split folders), '*_<k>' file "
        "names with labeled/unlabeled/test folders, or VOC-annotated slides (one crop per "
        "object). Every file is hashed and fully decoded; anything unusable goes to "
        "rejected.csv with its reason. Splits are stratified and grouped by source slide.",
    )
    ingest.add_argument("--source", type=Path, required=True, help="source data folder")
    ingest.add_argument("--out", type=Path, required=True,
                        help="output folder: manifest.parquet, rejected.csv, duplicates.csv, "
                             "metrics.json")

    preprocess = _add_command(
        commands, "preprocess", _cmd_preprocess,
        "Decode, crop and resize every manifest row into uint8 shards per split.",
        "Each file is decoded once; crops are cut from it and resized to "
        "preprocess.image_size (pad keeps the aspect ratio, crop fills the square).",
    )
    preprocess.add_argument("--manifest", type=Path, required=True, help="manifest.parquet")
    preprocess.add_argument("--source", type=Path, required=True,
                            help="the source folder the manifest's paths are relative to")
    preprocess.add_argument("--out", type=Path, required=True,
                            help="output folder: shards/, rejected.csv, metrics.json, preview.png")
    train = _add_command(
        commands, "train", _cmd_train,
        "Train a classifier on the shards (transfer learning, from scratch, pseudo-labels).",
        "Backbones come from one registry (train.backbone); train.phases says what trains "
        "when (head, the last N blocks, or all). Frozen-backbone phases train the head on "
        "cached features. A killed run resumes from its last epoch.",
        runs_on="torch",
    )
    train.add_argument("--shards", type=Path, required=True, help="preprocess shards folder")
    train.add_argument("--manifest", type=Path, required=True,
                       help="manifest.parquet (its hash goes into the checkpoint)")
    train.add_argument("--out", type=Path, required=True,
                       help="reports folder: history.csv, curves.png, metrics.json, checkpoints/")
    train.add_argument("--model", type=Path, required=True, help="checkpoint to write (model.pt)")

    evaluate = _add_command(
        commands, "evaluate", _cmd_evaluate,
        "Score the trained model on the test split, calibrate it, draw its errors.",
        "Writes accuracy, balanced accuracy, macro-F1, per-class precision/recall, "
        "one-vs-rest ROC-AUC and ECE; fits a temperature on val (saved for export); "
        "draws the confusion matrix, a reliability diagram and the most confident mistakes.",
        runs_on="torch",
    )
    evaluate.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt)")
    evaluate.add_argument("--shards", type=Path, required=True, help="preprocess shards folder")
    evaluate.add_argument("--out", type=Path, required=True, help="reports folder")
    evaluate.add_argument("--calibration", type=Path, required=True,
                          help="where to write the fitted temperature (JSON, beside the model)")

    backbones = commands.add_parser("backbones", help="List the registered backbones.")
    backbones.set_defaults(handler=_cmd_backbones)
    return parser


def _add_command(commands: argparse._SubParsersAction, name: str,
                 handler: Callable[[argparse.Namespace], None], summary: str,
                 details: str, *, runs_on: str = "cpu") -> argparse.ArgumentParser:
    """A stage subcommand; ``runs_on`` adds --workers (cpu) or --device (torch)."""
    command = commands.add_parser(name, help=summary, description=f"{summary} {details}")
    command.set_defaults(handler=handler)
    command.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE,
                         help="params file (default: %(default)s)")
    if runs_on == "cpu":
        command.add_argument("--workers", type=int, default=default_workers(),
                             help="decoding processes (default: all cores, %(default)s here)")
    else:
        command.add_argument("--device", default="auto",
                             help="auto (CUDA when present), cpu or cuda")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.handler(args)
    except CellpipeError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
