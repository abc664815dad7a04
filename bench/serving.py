"""Benchmark: serving throughput of the published default model on this machine.

Compares, on the same real test images (the demo's BCCD crops, repeated):
onnxruntime in-process at batch 64 (the limit here), the local Triton over
gRPC and HTTP at batch 64 with several concurrent requests, and a naive loop
that sends one image per request. Goals: Triton gRPC ≥ 0.8×
in-process and ≥ 20× the naive loop. Needs `make demo` (or `dvc repro
publish`) first. Writes bench/results/serving.{md,json} and prints the table.

    python bench/serving.py [--images 4096] [--concurrency 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from ingest_blood_cells import machine

from cellpipe.contract import to_model_input
from cellpipe.data.shards import open_split
from cellpipe.serving.client import TritonClassifier
from cellpipe.serving.onnx_model import open_session, predict_probabilities, read_contract
from cellpipe.serving.repository import ModelRepository
from cellpipe.serving.server import LocalTriton, free_port
from cellpipe.serving.triton_config import ServingParams

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BATCH = 64


def images_per_second(run, count: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timed runs (after one warm-up), in images per second."""
    run()
    best = min(_timed(run) for _ in range(repeats))
    return count / best


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=REPO / "outputs/export")
    parser.add_argument("--shards", type=Path, default=REPO / "outputs/preprocess/shards")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--naive-images", type=int, default=512)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    onnx_path = args.export / "model.onnx"
    if not onnx_path.is_file():
        raise SystemExit(f"{onnx_path} missing: run `make demo` (or `dvc repro export`) first")

    contract = read_contract(onnx_path)
    test = np.asarray(open_split(args.shards, "test").images)
    images = np.resize(test, (args.images, *test.shape[1:]))  # repeat the real crops
    inputs = to_model_input(images, contract)
    session = open_session(onnx_path)
    rows = [{"path": "onnxruntime in-process", "protocol": "-", "batch": BATCH,
             "concurrency": 1, "images_per_s": images_per_second(
                 lambda: predict_probabilities(session, contract, inputs, batch_size=BATCH),
                 len(inputs))}]
    single = inputs[:args.naive_images]
    rows.append({"path": "onnxruntime in-process, 1 image/call", "protocol": "-", "batch": 1,
                 "concurrency": 1, "images_per_s": images_per_second(
                     lambda: predict_probabilities(session, contract, single, batch_size=1),
                     len(single))})
    log.info("in-process: %.0f images/s at batch %d, %.0f at batch 1", rows[0]["images_per_s"],
             BATCH, rows[1]["images_per_s"])

    with tempfile.TemporaryDirectory(prefix="cellpipe-bench-") as scratch:
        repository = Path(scratch) / "triton_repo"
        ModelRepository(repository, ServingParams()).publish(args.export)
        server = LocalTriton(Path(scratch) / "state")
        info = server.start(repository, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port())
        try:
            rows += _triton_rows(info, inputs, args)
        finally:
            server.stop()

    reference = rows[0]["images_per_s"]
    naive = max(r["images_per_s"] for r in rows if r["path"].startswith("naive"))
    best_grpc = max(r["images_per_s"] for r in rows if r["protocol"] == "grpc" and r["batch"] > 1)
    for row in rows:
        row["vs_in_process"] = row["images_per_s"] / reference
        row["vs_naive"] = row["images_per_s"] / naive
    card = json.loads((args.export / "card.json").read_text())
    summary = {"machine": machine(), "rows": rows,
               "model": f"{card['backbone']} {contract.image_size} px {card['precision']}",
               "grpc_vs_in_process": best_grpc / reference, "grpc_vs_naive": best_grpc / naive,
               "goals_met": best_grpc >= 0.8 * reference and best_grpc >= 20 * naive}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = _markdown(summary)
    (RESULTS / "serving.md").write_text(table)
    print(table)


def _triton_rows(info, inputs: np.ndarray, args: argparse.Namespace) -> list[dict]:
    rows = []
    for protocol in ("grpc", "http"):
        for concurrency in args.concurrency:
            with TritonClassifier(info.url(protocol), protocol=protocol, batch_size=BATCH,
                                  concurrency=concurrency) as client:
                rate = images_per_second(lambda c=client: c.classify_tensors(inputs), len(inputs))
            rows.append({"path": "Triton", "protocol": protocol, "batch": BATCH,
                         "concurrency": concurrency, "images_per_s": rate})
            log.info("Triton %s, concurrency %d: %.0f images/s", protocol, concurrency, rate)
        with TritonClassifier(info.url(protocol), protocol=protocol, batch_size=1,
                              concurrency=1) as client:
            def one_by_one(c: TritonClassifier = client,
                           naive: np.ndarray = inputs[:args.naive_images]) -> None:
                for single in naive:  # what a first script does: one request per image
                    c.classify_tensors(single[np.newaxis])
            rate = images_per_second(one_by_one, args.naive_images, repeats=1)
        rows.append({"path": "naive loop, 1 image/request", "protocol": protocol, "batch": 1,
                     "concurrency": 1, "images_per_s": rate})
        log.info("naive %s: %.0f images/s", protocol, rate)
    return rows


def _markdown(summary: dict) -> str:
    lines = [f"Serving throughput, {summary['model']} — {summary['machine']}", "",
             "| path | protocol | batch | concurrent requests | images/s | × in-process | "
             "× naive |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in summary["rows"]:
        lines.append(f"| {row['path']} | {row['protocol']} | {row['batch']} | "
                     f"{row['concurrency']} | {row['images_per_s']:,.0f} | "
                     f"{row['vs_in_process']:.2f} | {row['vs_naive']:.1f} |")
    lines += ["", f"Best Triton gRPC: {summary['grpc_vs_in_process']:.2f}× in-process "
              f"(goal ≥ 0.8), {summary['grpc_vs_naive']:.1f}× the naive loop (goal ≥ 20): "
              f"{'met' if summary['goals_met'] else 'NOT met'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
