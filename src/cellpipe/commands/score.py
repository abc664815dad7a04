"""``cellpipe score INBOX --out RESULTS``: the daily batch, through Triton."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cellpipe.commands.servers import add_server_options, model_name, server_url
from cellpipe.params import DEFAULT_PARAMS_FILE, load_section

log = logging.getLogger(__name__)

# `cellpipe score --strict`: the batch finished, but some slides were quarantined. Distinct
# from 1 (the command failed), so a scheduler can tell "look at the quarantine" from "rerun".
EXIT_QUARANTINED = 3


def score(args: argparse.Namespace) -> int:
    """Score the inbox, print a table of the slides, and compare with a reference if asked
    (the comparison also lands in report.html)."""
    from cellpipe.serving.client import TritonClassifier
    from cellpipe.serving.server import local_model_card
    from cellpipe.slides.batch import ModelKey, score_inbox
    from cellpipe.slides.reference import compare_with_voc, count_errors, print_comparison
    from cellpipe.slides.report import REPORT_PAGE, write_report_page
    from cellpipe.slides.scoring import ScoreParams

    params = load_section(ScoreParams, "score", args.params)
    if args.mode:
        params = params.model_copy(update={"mode": args.mode})
    if args.workers is not None:
        params = params.model_copy(update={"workers": args.workers})
    with TritonClassifier(server_url(args, args.protocol), protocol=args.protocol,
                          model_name=model_name(args), timeout_s=params.request_timeout_s,
                          retries=params.retries) as client:
        model = ModelKey(client.model_name, client.pin_served_version())
        card = local_model_card(model.name, model.version, url=args.url,
                                state_dir=args.state_dir)
        report = score_inbox(args.inbox, args.out, client, params, model, model_card=card)
    for outcome in report["slides"]:
        if outcome["status"] == "quarantined":
            log.error("quarantined %s: %s", outcome["slide"], outcome["reason"])
    _print_slide_table(args.out / "summary.csv", model.tag)
    totals = report["totals"]
    print(f"{totals['scored']} scored, {totals['skipped']} already done, "
          f"{totals['quarantined']} quarantined, {totals['ignored']} hidden files ignored; "
          f"results in {args.out} "
          f"(report.html, summary.csv, slides/*/overlay.jpg, objects.geojson, report.json)")
    if args.compare_voc:
        comparison = compare_with_voc(args.out, args.compare_voc, model)
        print_comparison(comparison)
        if not comparison.empty:  # the page again, now with the count errors
            write_report_page(args.out, report, model_card=card,
                              count_errors=count_errors(comparison))
    page = args.out / REPORT_PAGE
    if page.is_file():
        print(f"Report: {page.resolve()}")
    return EXIT_QUARANTINED if args.strict and totals["quarantined"] else 0


def _print_slide_table(summary_csv: Path, model_tag: str) -> None:
    import pandas as pd

    table = pd.read_csv(summary_csv) if summary_csv.stat().st_size > 1 else pd.DataFrame()
    if table.empty:
        return
    table = table[table["model"] == model_tag]
    columns = ["slide", "objects", *[c for c in table.columns if c.startswith("n_")], "result"]
    print(table[columns].to_string(index=False))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``cellpipe score``."""
    summary = "Score every new slide of an inbox on Triton."
    command = commands.add_parser(
        "score", help=summary,
        description=f"{summary} Each slide is scored once per (content, model version): a "
                    "rerun skips what is done and finishes what a crash left. Unreadable "
                    "slides are quarantined with the reason. Tunables: the 'score' section "
                    "of params.yaml.")
    command.set_defaults(handler=score)
    command.add_argument("inbox", help="folder or fsspec URL of slide images")
    command.add_argument("--out", type=Path, required=True, help="results folder")
    command.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE,
                         help="params file (default: %(default)s)")
    command.add_argument("--mode", choices=("cells", "tiles"), help="override score.mode")
    command.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    command.add_argument("--workers", type=int, metavar="N",
                         help="processes scoring slides at once; 0: every core, 1: one "
                              "process (default: score.workers)")
    add_server_options(command)
    command.add_argument("--state-dir", type=Path, default=None,
                         help="where `cellpipe triton start` keeps the local server's state")
    command.add_argument("--strict", action="store_true",
                         help=f"exit with status {EXIT_QUARANTINED} when any slide is "
                              "quarantined (the rest is still scored)")
    command.add_argument("--compare-voc", type=Path, metavar="ANNOTATIONS",
                         help="a VOC Annotations folder: compare the counts with its boxes")
