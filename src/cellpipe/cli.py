"""The ``cellpipe`` command line: one subcommand per pipeline stage.

Paths come from the command line (dvc.yaml owns them); tunables come from one
section of params.yaml each. Errors meant for the user are printed without a
traceback; ``--verbose`` adds debug logging.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cellpipe import __version__
from cellpipe.errors import CellpipeError, InputError, ParamsError
from cellpipe.parallel import default_workers
from cellpipe.params import DEFAULT_PARAMS_FILE, load_section
from cellpipe.redact import install_log_redaction

log = logging.getLogger("cellpipe")

# `cellpipe score --strict`: the batch finished, but some slides were quarantined. Distinct
# from 1 (the command failed), so a scheduler can tell "look at the quarantine" from "rerun".
EXIT_QUARANTINED = 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool cut off by `head`


class ServerUnreachable(CellpipeError):
    """No Triton server answers where the command looked for one."""


def _cmd_ingest(args: argparse.Namespace) -> None:
    from cellpipe.stages import ingest

    params = load_section(ingest.IngestParams, "ingest", args.params)
    ingest.run(args.source, args.out, params, workers=args.workers)


def _cmd_preprocess(args: argparse.Namespace) -> None:
    from cellpipe.stages import preprocess

    params = load_section(preprocess.PreprocessParams, "preprocess", args.params)
    preprocess.run(args.manifest, args.source, args.out, params, workers=args.workers)


def _cmd_augment(args: argparse.Namespace) -> None:
    from cellpipe.stages import augment

    params = load_section(augment.AugmentParams, "augment", args.params)
    augment.run(args.shards, args.out, args.model_dir, params, device=args.device)


def _cmd_train(args: argparse.Namespace) -> None:
    from cellpipe.stages import train

    params = load_section(train.TrainParams, "train", args.params)
    train.run(args.shards, args.manifest, args.out, args.model, params,
              synthetic=args.synthetic, device=args.device)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from cellpipe.stages import evaluate

    params = load_section(evaluate.EvaluateParams, "evaluate", args.params)
    args.out.mkdir(parents=True, exist_ok=True)
    evaluate.evaluate(args.model, args.shards, args.out, args.calibration, params,
                      device=args.device)


def _cmd_export(args: argparse.Namespace) -> None:
    from cellpipe.stages import export

    params = load_section(export.ExportParams, "export", args.params)
    export.run(args.model, args.calibration, args.shards, args.out, params)


def _cmd_publish(args: argparse.Namespace) -> None:
    from cellpipe.stages import publish

    params = load_section(publish.PublishParams, "publish", args.params)
    if args.rollback:
        version = publish.rollback(args.repo, params, url=args.url)
        print(f"{params.model_name}: version {version} is served again")
        return
    if args.export is None or args.report is None:
        raise ParamsError("publish needs --export and --report (or --rollback)")
    result = publish.run(args.export, args.repo, args.report, params, url=args.url,
                         force=args.force)
    print(f"{params.model_name}: {result['action']} (served version {result['version']}): "
          f"{result['reason']}")


def _cmd_triton_start(args: argparse.Namespace) -> None:
    from cellpipe.serving.server import LocalTriton

    info = LocalTriton(args.state_dir).start(
        args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, timeout_s=args.timeout, host=args.host)
    print(f"Triton ready: HTTP {info.http_url}, gRPC {info.grpc_url} (pid {info.pid}, "
          f"log {info.log_file})")


def _cmd_triton_stop(args: argparse.Namespace) -> None:
    from cellpipe.serving.server import LocalTriton

    stopped = LocalTriton(args.state_dir).stop()
    print("Triton stopped" if stopped else "no local Triton was running")


def _cmd_triton_status(args: argparse.Namespace) -> None:
    import tritonclient.http as httpclient

    url = _server_url(args, "http")
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


def _cmd_triton_classify(args: argparse.Namespace) -> None:
    from cellpipe.serving.client import TritonClassifier

    readable, rejected = [], []
    for path in args.files:
        try:
            readable.append((path, path.read_bytes()))
        except OSError as error:
            rejected.append((path, f"cannot read file: {error.strerror or error}"))
    with TritonClassifier(_server_url(args, args.protocol), protocol=args.protocol,
                          model_name=_model_name(args)) as client:
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


def _cmd_triton_verify(args: argparse.Namespace) -> None:
    from cellpipe.serving.verify import verify_server

    for protocol in ("grpc", "http") if args.protocol == "both" else (args.protocol,):
        result = verify_server(args.onnx, args.shards, args.split, _server_url(args, protocol),
                               protocol, model_name=_model_name(args), limit=args.limit)
        print(f"{protocol}: {result['images']} {args.split} images, max |Δp| vs onnxruntime "
              f"in-process: tensors {result['tensor_max_abs_difference']:.1e}, image bytes "
              f"{result['bytes_max_abs_difference']:.1e}; accuracy {result['accuracy']:.4f}, "
              f"macro-F1 {result['macro_f1']:.4f}")


def _cmd_score(args: argparse.Namespace) -> int:
    from cellpipe.serving.client import TritonClassifier
    from cellpipe.slides.batch import ModelKey, score_inbox
    from cellpipe.slides.reference import compare_with_voc, print_comparison
    from cellpipe.slides.scoring import ScoreParams

    params = load_section(ScoreParams, "score", args.params)
    if args.mode:
        params = params.model_copy(update={"mode": args.mode})
    with TritonClassifier(_server_url(args, args.protocol), protocol=args.protocol,
                          model_name=_model_name(args), timeout_s=params.request_timeout_s,
                          retries=params.retries) as client:
        model = ModelKey(client.model_name, client.pin_served_version())
        report = score_inbox(args.inbox, args.out, client, params, model)
    for outcome in report["slides"]:
        if outcome["status"] == "quarantined":
            log.error("quarantined %s: %s", outcome["slide"], outcome["reason"])
    _print_slide_table(args.out / "summary.csv", model.tag)
    totals = report["totals"]
    print(f"{totals['scored']} scored, {totals['skipped']} already done, "
          f"{totals['quarantined']} quarantined, {totals['ignored']} hidden files ignored; "
          f"results in {args.out} "
          f"(summary.csv, slides/*/overlay.png, report.json)")
    if args.compare_voc:
        print_comparison(compare_with_voc(args.out, args.compare_voc, model))
    return EXIT_QUARANTINED if args.strict and totals["quarantined"] else 0


def _print_slide_table(summary_csv: Path, model_tag: str) -> None:
    import pandas as pd

    table = pd.read_csv(summary_csv) if summary_csv.stat().st_size > 1 else pd.DataFrame()
    if table.empty:
        return
    table = table[table["model"] == model_tag]
    columns = ["slide", "objects", *[c for c in table.columns if c.startswith("n_")], "result"]
    print(table[columns].to_string(index=False))


def _prepare_flows(args: argparse.Namespace, api_url: str | None = None):  # noqa: ANN202
    """Offline Prefect settings, then the repository's flows/deployments module."""
    from cellpipe.orchestration import apply_prefect_environment

    repo = args.repo.resolve()
    if not (repo / "flows" / "deployments.py").is_file():
        raise InputError(f"{repo} holds no flows/deployments.py (use --repo)")
    apply_prefect_environment(args.home or repo / ".cellpipe" / "prefect", api_url)
    sys.path.insert(0, str(repo))
    import flows.deployments

    return repo, flows.deployments


def _cmd_flows_serve(args: argparse.Namespace) -> None:
    import signal

    from cellpipe.orchestration import PrefectServer

    server = PrefectServer(args.home or args.repo.resolve() / ".cellpipe" / "prefect",
                           args.port)
    repo, deployments = _prepare_flows(args, server.api_url)
    params_file = (args.params or repo / "params.yaml").resolve()
    params = load_section(deployments.FlowsParams, "flows", params_file)
    # SIGTERM (how services are stopped) must unwind like Ctrl-C, so the server stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.start()
    try:
        log.info("serving the training and scoring deployments; Ctrl-C or SIGTERM stops")
        deployments.serve_deployments(params, repo, params_file, url=args.url,
                                      interval_s=args.interval, only=args.only)
    finally:
        server.stop()


def _cmd_flows_run(args: argparse.Namespace) -> None:
    repo, deployments = _prepare_flows(args)
    params_file = (args.params or repo / "params.yaml").resolve()
    params = load_section(deployments.FlowsParams, "flows", params_file)
    if args.flow == "training":
        from flows.training import training

        training(repo=str(repo))
    else:
        scoring = deployments.scoring_flow_for(params, args.dask_address)
        result = scoring(inbox=args.inbox or params.inbox, out=args.out or params.results,
                         url=args.url, protocol=params.protocol,
                         params_file=str(params_file),
                         triton_state_dir=str(repo / ".cellpipe" / "triton"))
        print(result["totals"])


def _model_name(args: argparse.Namespace) -> str:
    """--model-name if given, else publish.model_name of the command's params file."""
    from cellpipe.serving.triton_config import published_model_name

    return args.model_name or published_model_name(getattr(args, "params", None)
                                                   or DEFAULT_PARAMS_FILE)


def _server_url(args: argparse.Namespace, protocol: str) -> str:
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
    augment = _add_command(
        commands, "augment", _cmd_augment,
        "Train a class-conditional GAN on the train split and sample synthetic images.",
        "DCGAN (bce) or WGAN-GP, 32-256 px, spectral norm, DiffAugment and an averaged "
        "generator (augment.gan). Sample quality (FID, KID, precision, recall) is measured "
        "against val. Synthetic images only ever join the train split; the train stage's "
        "data gate decides whether they are used. augment.enabled: false skips the GAN.",
        runs_on="torch",
    )
    augment.add_argument("--shards", type=Path, required=True, help="preprocess shards folder")
    augment.add_argument("--out", type=Path, required=True,
                         help="folder: synthetic/, samples/, history.csv, metrics.json")
    augment.add_argument("--model-dir", type=Path, required=True,
                         help="folder for generator.pt and card.json")
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
    train.add_argument("--synthetic", type=Path,
                       help="the augment stage's synthetic folder; the data gate decides "
                            "whether its images are used (train.synthetic)")

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

    export = _add_command(
        commands, "export", _cmd_export,
        "Export the checkpoint to ONNX (temperature folded in), proven equal to PyTorch.",
        "Parity is checked on every validation image (max |Δp| ≤ export.parity_tolerance, "
        "identical argmax); the stage fails and writes nothing otherwise. Optional dynamic "
        "INT8 is kept only if validation accuracy drops less than the margin.", runs_on="none",
    )
    export.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt)")
    export.add_argument("--calibration", type=Path, required=True,
                        help="calibration.json written by evaluate")
    export.add_argument("--shards", type=Path, required=True, help="preprocess shards folder")
    export.add_argument("--out", type=Path, required=True,
                        help="output folder: model.onnx, card.json, metrics.json")

    publish = _add_command(
        commands, "publish", _cmd_publish,
        "Publish the exported model as a new version of the Triton repository.",
        "A version is written to a hidden folder and renamed into place; it is published "
        "only if its val macro-F1 reaches the served version's + publish.min_gain. A "
        "running server (--url, or the local one) loads it and is checked against "
        "onnxruntime in-process.", runs_on="none",
    )
    publish.add_argument("--export", type=Path, help="export folder (model.onnx, card.json)")
    publish.add_argument("--repo", type=Path, required=True, help="Triton model repository")
    publish.add_argument("--report", type=Path, help="where to write the publish report (JSON)")
    publish.add_argument("--url", help="Triton HTTP host:port to reload (default: the local "
                                       "server, if one runs)")
    publish.add_argument("--force", action="store_true",
                         help="publish even if the champion scores higher")
    publish.add_argument("--rollback", action="store_true",
                         help="retire the served version and serve the previous one")

    _add_triton_commands(commands)
    _add_score_command(commands)
    _add_flows_command(commands)

    backbones = commands.add_parser("backbones", help="List the registered backbones.")
    backbones.set_defaults(handler=_cmd_backbones)
    return parser


def _add_score_command(commands: argparse._SubParsersAction) -> None:
    """``cellpipe score INBOX --out RESULTS``: the daily batch, through Triton."""
    score = _add_command(
        commands, "score", _cmd_score, "Score every new slide of an inbox on Triton.",
        "Each slide is scored once per (content, model version): a rerun skips what is done "
        "and finishes what a crash left. Unreadable slides are quarantined with the reason. "
        "Tunables: the 'score' section of params.yaml.", runs_on="none")
    score.add_argument("inbox", help="folder or fsspec URL of slide images")
    score.add_argument("--out", type=Path, required=True, help="results folder")
    score.add_argument("--mode", choices=("cells", "tiles"), help="override score.mode")
    score.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    score.add_argument("--url", help="host:port for --protocol (default: the local server)")
    score.add_argument("--model-name",
                       help="published model name (default: publish.model_name in --params)")
    score.add_argument("--state-dir", type=Path, default=None,
                       help="where `cellpipe triton start` keeps the local server's state")
    score.add_argument("--strict", action="store_true",
                       help=f"exit with status {EXIT_QUARANTINED} when any slide is quarantined "
                            "(the rest is still scored)")
    score.add_argument("--compare-voc", type=Path, metavar="ANNOTATIONS",
                       help="a VOC Annotations folder: compare the counts with its boxes")


def _add_flows_command(commands: argparse._SubParsersAction) -> None:
    """``cellpipe flows serve|run``: the Prefect side."""
    flows = commands.add_parser("flows", help="Run or schedule the Prefect flows.",
                                description="Deployments and schedules: params.yaml 'flows'.")
    actions = flows.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="Start a local Prefect server and serve the "
                                             "scheduled deployments until stopped.")
    serve.set_defaults(handler=_cmd_flows_serve)
    serve.add_argument("--port", type=int, default=4200, help="Prefect API port on 127.0.0.1")
    serve.add_argument("--interval", type=float, help="seconds between runs instead of the crons")
    serve.add_argument("--only", choices=("training", "scoring"), help="serve one flow only")
    run = actions.add_parser("run", help="Run one flow now (Prefect's ephemeral mode).")
    run.set_defaults(handler=_cmd_flows_run)
    run.add_argument("flow", choices=("training", "scoring"))
    run.add_argument("--inbox", help="scoring: inbox (default: flows.inbox)")
    run.add_argument("--out", help="scoring: results folder (default: flows.results)")
    run.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                     help="scoring: run the per-slide tasks on this running Dask scheduler "
                          "(default: flows.dask_address, else flows.dask_workers)")
    for command in (serve, run):
        command.add_argument("--repo", type=Path, default=Path("."),
                             help="the cellpipe repository (default: the current folder)")
        command.add_argument("--url", help="Triton host:port (default: the local server)")
        command.add_argument("--params", type=Path,
                             help="params file (default: params.yaml in --repo)")
        command.add_argument("--home", type=Path,
                             help="Prefect's home: database, logs (default: .cellpipe/prefect "
                                  "in --repo)")


def _add_triton_commands(commands: argparse._SubParsersAction) -> None:
    """``cellpipe triton start|stop|status|classify|verify``."""
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

    start = action("start", _cmd_triton_start, "Start the local Triton; wait until ready.")
    start.add_argument("--repo", type=Path, default=Path("triton_repo"),
                       help="model repository (default: %(default)s)")
    for name, port in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        start.add_argument(f"--{name}-port", type=int, default=port,
                           help=f"{name} port (default: %(default)s)")
    start.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s, this machine only; "
                            "0.0.0.0 in a container that serves others)")
    start.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for readiness (default: %(default)s)")
    action("stop", _cmd_triton_stop, "Stop the local Triton (SIGTERM, then SIGKILL).")
    status = action("status", _cmd_triton_status, "Readiness and model states of a server.")
    status.add_argument("--url", help="HTTP host:port (default: the local server)")

    def scoring(command: argparse.ArgumentParser) -> None:
        command.add_argument("--url", help="host:port for --protocol (default: local server)")
        command.add_argument("--model-name",
                             help="published model name (default: publish.model_name in "
                                  "params.yaml)")

    classify = action("classify", _cmd_triton_classify,
                      "Classify image files as they are (server-side preprocessing).")
    classify.add_argument("files", type=Path, nargs="+", help="PNG, JPEG, BMP or TIFF files")
    classify.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    scoring(classify)
    verify = action("verify", _cmd_triton_verify,
                    "Score a shard split on the server and in-process; compare the answers.")
    verify.add_argument("--onnx", type=Path, default=Path("outputs/export/model.onnx"),
                        help="the published model, run in-process (default: %(default)s)")
    verify.add_argument("--shards", type=Path, default=Path("outputs/preprocess/shards"),
                        help="preprocess shards (default: %(default)s)")
    verify.add_argument("--split", default="test", help="split to score (default: test)")
    verify.add_argument("--limit", type=int, help="score only the first N images")
    verify.add_argument("--protocol", choices=("grpc", "http", "both"), default="both")
    scoring(verify)


def _add_command(commands: argparse._SubParsersAction, name: str,
                 handler: Callable[[argparse.Namespace], int | None], summary: str,
                 details: str, *, runs_on: str = "cpu") -> argparse.ArgumentParser:
    """A stage subcommand; ``runs_on`` adds --workers (cpu), --device (torch) or nothing."""
    command = commands.add_parser(name, help=summary, description=f"{summary} {details}")
    command.set_defaults(handler=handler)
    command.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE,
                         help="params file (default: %(default)s)")
    if runs_on == "none":
        return command
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
    install_log_redaction()  # no inbox/remote/server credentials in any log line
    try:
        return args.handler(args) or 0
    except CellpipeError as error:
        log.error("%s", error)
        return 1
    except BrokenPipeError:
        # The reader went away (`cellpipe … | head`): stop quietly, as Unix tools do, and
        # point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
