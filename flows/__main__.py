"""``python -m flows serve|run``: the flows' own entry point (``cellpipe flows`` calls it).

``serve`` starts a local Prefect server (schedules need one) with its dashboard, points
Prefect at it, prints the dashboard's URL and serves both deployments until stopped;
``run`` runs one flow now, in Prefect's ephemeral mode. Prefect's settings are made
offline and project-local before Prefect is imported.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from cellpipe.errors import CellpipeError
from cellpipe.logs import configure_logging
from cellpipe.orchestration import PrefectServer, apply_prefect_environment
from cellpipe.params import load_section

log = logging.getLogger("flows")


def _home(args: argparse.Namespace) -> Path:
    return args.home or args.repo.resolve() / ".cellpipe" / "prefect"


def _params_file(args: argparse.Namespace) -> Path:
    return (args.params or args.repo.resolve() / "params.yaml").resolve()


def serve(args: argparse.Namespace) -> None:
    """Serve the training and scoring deployments on their schedules until stopped; the
    dashboard's URL goes to stdout once the server answers."""
    server = PrefectServer(_home(args), args.port)
    apply_prefect_environment(_home(args), server.api_url)
    from flows import deployments

    params = load_section(deployments.FlowsParams, "flows", _params_file(args))
    # SIGTERM (how services are stopped) must unwind like Ctrl-C, so the server stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.start()
    try:
        print(f"Prefect dashboard: {server.dashboard_url}", flush=True)
        log.info("serving the training and scoring deployments; Ctrl-C or SIGTERM stops")
        deployments.serve_deployments(params, args.repo.resolve(), _params_file(args),
                                      url=args.url, interval_s=args.interval, only=args.only)
    finally:
        server.stop()


def run(args: argparse.Namespace) -> None:
    """Run one flow now and print its totals."""
    apply_prefect_environment(_home(args))
    from flows import deployments

    repo, params_file = args.repo.resolve(), _params_file(args)
    params = load_section(deployments.FlowsParams, "flows", params_file)
    if args.flow == "training":
        from flows.training import training

        training(repo=str(repo))
        return
    scoring = deployments.scoring_flow_for(params, args.dask_address)
    result = scoring(inbox=args.inbox or params.inbox, out=args.out or params.results,
                     url=args.url, protocol=params.protocol, params_file=str(params_file),
                     triton_state_dir=str(repo / ".cellpipe" / "triton"))
    print(result["totals"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellpipe flows", description="Deployments and schedules: params.yaml 'flows'.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    serving = actions.add_parser("serve", help="Start a local Prefect server and serve the "
                                               "scheduled deployments until stopped.")
    serving.set_defaults(handler=serve)
    serving.add_argument("--port", type=int, default=4200,
                         help="port of the Prefect API and dashboard on 127.0.0.1")
    serving.add_argument("--interval", type=float,
                         help="seconds between runs instead of the crons")
    serving.add_argument("--only", choices=("training", "scoring"), help="serve one flow only")
    running = actions.add_parser("run", help="Run one flow now (Prefect's ephemeral mode).")
    running.set_defaults(handler=run)
    running.add_argument("flow", choices=("training", "scoring"))
    running.add_argument("--inbox", help="scoring: inbox (default: flows.inbox)")
    running.add_argument("--out", help="scoring: results folder (default: flows.results)")
    running.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                         help="scoring: run the per-slide tasks on this running Dask scheduler "
                              "(default: flows.dask_address, else flows.dask_workers)")
    for command in (serving, running):
        command.add_argument("--repo", type=Path, default=Path("."),
                             help="the cellpipe repository (default: the current folder)")
        command.add_argument("--url", help="Triton host:port (default: the local server)")
        command.add_argument("--params", type=Path,
                             help="params file (default: params.yaml in --repo)")
        command.add_argument("--home", type=Path,
                             help="Prefect's home: database, logs (default: .cellpipe/prefect "
                                  "in --repo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        args.handler(args)
    except CellpipeError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
