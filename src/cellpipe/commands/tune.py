"""``cellpipe tune --budget MINUTES``: search training recipes on the ingested data, write
the best into params.yaml, then ``dvc repro`` trains it."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from pathlib import Path

import yaml

from cellpipe.errors import CellpipeError, InputError, Interrupted
from cellpipe.parallel import default_workers
from cellpipe.params import DEFAULT_PARAMS_FILE, load_section

log = logging.getLogger(__name__)

DEFAULT_MANIFEST = Path("outputs/ingest/manifest.parquet")  # where `dvc repro ingest` puts it


def tune(args: argparse.Namespace) -> None:
    """Run or resume the search, write its reports, and write its choice into params.yaml."""
    import optuna

    from cellpipe.stages.preprocess import PreprocessParams
    from cellpipe.stages.train import TrainParams
    from cellpipe.tuning.params_file import write_params
    from cellpipe.tuning.report import BEST_YAML, TRIALS_CSV, TRIALS_PLOT, write_reports
    from cellpipe.tuning.search import Budget, TuneInputs
    from cellpipe.tuning.search import tune as run_search

    # Optuna's lines through cellpipe's logging; its per-trial INFO lines would repeat ours.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    budget = Budget(args.budget)  # counted from here: preprocessing is part of it
    if not args.manifest.is_file():
        raise InputError(f"no manifest at {args.manifest}: run `dvc repro ingest` (or "
                         "`cellpipe ingest --source DIR --out outputs/ingest`) first")
    source = args.source or _data_source(args.params)
    inputs = TuneInputs(args.manifest, source,
                        load_section(PreprocessParams, "preprocess", args.params),
                        load_section(TrainParams, "train", args.params))
    log.info("searching recipes for %.0f min on %s (images in %s), results in %s",
             args.budget, args.manifest, source, args.out)
    result = run_search(inputs, args.out, budget=budget, seed=args.seed,
                        max_trials=args.trials, epochs=args.epochs, device=args.device,
                        workers=args.workers)
    if result.interrupted:  # the best so far is reported, but a stopped search decides nothing
        with contextlib.suppress(CellpipeError):  # no trial finished: nothing to report yet
            write_reports(result.study, result.space, args.out)
        log.warning("search stopped by Ctrl-C: params.yaml left as it is; the same command "
                    "resumes the search")
        raise Interrupted(signal.SIGINT)
    choice = write_reports(result.study, result.space, args.out)
    log.info("best: trial %d, %s, val macro-F1 %.4f; every trial in %s and %s, the choice "
             "in %s", choice["trial"], choice["recipe"], choice["val_macro_f1"],
             args.out / TRIALS_CSV, args.out / TRIALS_PLOT, args.out / BEST_YAML)
    if args.no_write_params:
        log.info("params.yaml left as it is (--no-write-params)")
        return
    changes = write_params(args.params, choice["params"])
    for change in changes:
        log.info("%s: %s -> %s", change.key, change.old, change.new)
    log.info("%s: %s; next: `dvc repro` trains, evaluates and exports the chosen recipe",
             args.params, f"{len(changes)} keys changed" if changes else "already the choice")


def _data_source(params: Path) -> Path:
    """``data.source`` of params.yaml: the folder the manifest's paths are relative to."""
    document = yaml.safe_load(params.read_text()) if params.is_file() else {}
    source = ((document or {}).get("data") or {}).get("source")
    if not source:
        raise InputError(f"no data.source in {params}: pass --source DIR")
    return Path(source)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``cellpipe tune``."""
    summary = "Search training recipes within a time budget; write the best into params.yaml."
    command = commands.add_parser(
        "tune", help=summary,
        description=f"{summary} Each trial preprocesses the ingested train and val images at "
                    "an input size and trains a recipe (backbone whole or truncated, or the "
                    "small CNN from scratch; head only or fine-tuned; augmentation strength) "
                    "with the train stage; the score is its best val macro-F1. The test split "
                    "is never read. Optuna (TPE) chooses the recipes; the study is kept in "
                    "OUT/study.db, so running the command again resumes it. Writes "
                    "OUT/trials.csv, trials.png and best.yaml.")
    command.set_defaults(handler=tune)
    command.add_argument("--budget", type=float, default=30.0, metavar="MINUTES",
                         help="wall-clock minutes for the whole search (default: %(default)s)")
    command.add_argument("--out", type=Path, default=Path("outputs/tune"),
                         help="study, cached shards, trials and reports (default: %(default)s)")
    command.add_argument("--seed", type=int, default=42, help="the sampler's seed")
    command.add_argument("--trials", type=int, metavar="N",
                         help="run at most N trials (default: as many as the budget allows)")
    command.add_argument("--epochs", type=int, metavar="E",
                         help="epochs per unit: head 2E, fine-tuning E, from scratch 3E "
                              "(default: 15, or what the resumed study used)")
    command.add_argument("--no-write-params", action="store_true",
                         help="leave params.yaml alone; the choice is in best.yaml")
    command.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE,
                         help="the base recipe, and where the choice is written "
                              "(default: %(default)s)")
    command.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                         help="the ingest stage's manifest (default: %(default)s)")
    command.add_argument("--source", type=Path,
                         help="the folder the manifest's paths are relative to "
                              "(default: data.source of params.yaml)")
    command.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    command.add_argument("--workers", type=int, default=default_workers(),
                         help="decoding processes (default: all cores, %(default)s here)")
