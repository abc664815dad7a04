"""Benchmark: score the BCCD test slides end to end through the local Triton.

Needs the demo pipeline's published model (`make demo` or `dvc repro` first). Reports
slides/s and cells/s over the whole batch, the share of time per phase (read, find
cells, infer, overlay, write), and the per-slide counts against the VOC annotations:
mean absolute error per class and the share of slides counted exactly.

It also measures the limit: a loop in this one process that only decodes each JPEG and
classifies its cells' crops with onnxruntime (the same model, crops cut as scoring cuts
them; the cells were found beforehand, untimed). The ratio of the two is how close the
scoring gets to decoding and inference alone.

    python bench/slides.py [--protocol grpc] [--split test] [--workers N] [--repeats 3] [--tag NAME]

``--workers`` overrides score.workers (1: one process, as before parallel scoring);
``--png-level`` writes PNG overlays at that zlib level (with ``--workers 1``); ``--tag`` writes
slides_<tag>.md/.json instead of slides.md/.json, to compare settings without
overwriting the reference run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from machine import cores, cpu_name
from PIL import Image

from cellpipe.contract import ModelContract, fit_to_contract, to_model_input
from cellpipe.data.geometry import Box, cut
from cellpipe.params import load_section
from cellpipe.serving.client import TritonClassifier
from cellpipe.serving.server import LocalTriton, free_port
from cellpipe.slides import batch
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import find_cells
from cellpipe.slides.reference import compare_with_voc, count_errors
from cellpipe.slides.scoring import ScoreParams

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "data" / "bccd"
RESULTS = ROOT / "bench" / "results"
ONNX_MODEL = ROOT / "outputs" / "export" / "model.onnx"  # the model the demo publishes
PHASES = ("read", "find", "infer", "overlay", "write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--split", default="test", help="BCCD ImageSets/Main split")
    parser.add_argument("--workers", type=int, help="score.workers (0: every core)")
    parser.add_argument("--png-level", type=int, help="zlib level of overlay PNGs")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--repo", type=Path, default=ROOT / "triton_repo",
                        help="Triton model repository to serve (e.g. a copy with other "
                             "instance/thread settings)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="score the inbox this many times (fresh results each time) and "
                             "report the median run: the machine may be shared")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_section(ScoreParams, "score", ROOT / "params.yaml")
    if args.workers is not None:
        params = params.model_copy(update={"workers": args.workers})
    stems = _stems(args.split)
    workers = batch.scoring_workers(params, len(stems))
    if args.png_level is not None:
        if workers > 1:  # a module constant: worker processes would not see it
            parser.error("--png-level needs --workers 1")
        batch.PNG_COMPRESS_LEVEL = args.png_level
        params = params.model_copy(update={"overlay_format": "png"})
    with tempfile.TemporaryDirectory(prefix="cellpipe-bench-") as folder:
        inbox, out = Path(folder) / "inbox", Path(folder) / "results"
        inbox.mkdir()
        for stem in stems:
            shutil.copy(BCCD / "JPEGImages" / f"{stem}.jpg", inbox)
        server = LocalTriton(Path(folder) / "triton")
        info = server.start(args.repo, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port())
        try:
            with TritonClassifier(info.url(args.protocol), protocol=args.protocol) as client:
                model = ModelKey(client.model_name, client.pin_served_version())
                runs = [_timed_run(inbox, Path(folder) / f"results_{index}", client, params,
                                   model) for index in range(max(1, args.repeats))]
        finally:
            server.stop()
        wall, out, report = sorted(runs, key=lambda run: run[0])[len(runs) // 2]  # the median
        summaries = [json.loads(p.read_text()) for p in (out / "slides").glob("*/summary.json")]
        errors = count_errors(compare_with_voc(out, BCCD / "Annotations", model))
    limit = decode_and_classify_per_second(stems, params)
    walls = sorted(run[0] for run in runs)
    write_tables(summaries, errors, wall, report, args, workers, limit, walls,
                 _overlay_name(params))


def _timed_run(inbox: Path, out: Path, client: TritonClassifier, params: ScoreParams,
               model: ModelKey) -> tuple[float, Path, dict]:
    """Score the inbox into a fresh ``out``: (wall seconds, ``out``, the run's report)."""
    started = time.perf_counter()
    report = score_inbox(str(inbox), out, client, params, model)
    return time.perf_counter() - started, out, report


def _overlay_name(params: ScoreParams) -> str:
    if not params.overlay:
        return "no overlay"
    if params.overlay_format == "png":
        return f"overlay PNG zlib level {batch.PNG_COMPRESS_LEVEL}"
    return "overlay JPEG q90 4:4:4"


def _stems(split: str) -> list[str]:
    return (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def decode_and_classify_per_second(stems: list[str], params: ScoreParams) -> float:
    """Slides/s of the limit: decode each JPEG, cut its cells' crops, classify them with
    onnxruntime in this process (best of two passes; finding the cells is not timed)."""
    # Imported here, not at the top: spawned scoring workers import this script again
    # (as __mp_main__), and onnxruntime would add seconds to each worker's start.
    from cellpipe.serving.onnx_model import open_session, read_contract

    contract = read_contract(ONNX_MODEL)
    session = open_session(ONNX_MODEL)
    files = [BCCD / "JPEGImages" / f"{stem}.jpg" for stem in stems]
    boxes = [[cell.box for cell in find_cells(_decode(path), params.cells)] for path in files]
    passes = []
    for _ in range(2):
        started = time.perf_counter()
        for path, slide_boxes in zip(files, boxes, strict=True):
            _classify_crops(_decode(path), slide_boxes, contract, session)
        passes.append(time.perf_counter() - started)
    return len(files) / min(passes)


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _classify_crops(rgb: np.ndarray, boxes: list[Box], contract: ModelContract,
                    session: object) -> np.ndarray:
    from cellpipe.serving.onnx_model import predict_probabilities

    height, width = rgb.shape[:2]
    crops = np.stack([fit_to_contract(cut(rgb, contract.crop_geometry.crop(box, width, height),
                                          fill=contract.pad_value), contract) for box in boxes])
    return predict_probabilities(session, contract, to_model_input(crops, contract))


def write_tables(summaries: list[dict], errors: pd.DataFrame, wall: float, report: dict,
                 args: argparse.Namespace, workers: int, limit: float,
                 walls: list[float], overlay: str) -> None:
    cells = sum(s["objects"] for s in summaries)
    phase_seconds = {phase: sum(s["timings"].get(phase, 0.0) for s in summaries)
                     for phase in PHASES}
    accounted = sum(phase_seconds.values())
    # Shares of the time the scoring processes spent on slides (each slide's total and
    # its write), not of the wall clock: with several processes those add up to more.
    busy = sum(s["timings"]["total"] + s["timings"].get("write", 0.0) for s in summaries)
    machine = f"{cpu_name()}, {cores()} cores"
    result = {
        "machine": machine, "protocol": args.protocol, "split": args.split,
        "workers": workers, "overlay": overlay,
        "slides": len(summaries), "quarantined": report["totals"]["quarantined"],
        "cells": cells, "wall_s": round(wall, 2),
        "slides_per_s": round(len(summaries) / wall, 3), "cells_per_s": round(cells / wall, 1),
        "phase_share": {k: round(v / busy, 4) for k, v in phase_seconds.items()},
        "other_share": round(1 - accounted / busy, 4),
        "runs_wall_s": [round(w, 2) for w in walls],
        "runs_slides_per_s": [round(len(summaries) / w, 3) for w in walls],
        "limit_slides_per_s": round(limit, 3),
        "ratio_to_limit": round(len(summaries) / wall / limit, 3),
        "counts": errors.to_dict(orient="records"),
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"slides_{args.tag}" if args.tag else "slides"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    shares = " · ".join(f"{k} {v:.0%}" for k, v in result["phase_share"].items())
    lines = [
        f"BCCD {args.split} slides ({len(summaries)} of 640×480), cells mode, Triton "
        f"{args.protocol} on 127.0.0.1; {machine}; {workers} scoring process(es), "
        f"{overlay}. Time shares are of the time "
        "the scoring processes spent on slides. The limit: decoding each JPEG and "
        "classifying its crops with onnxruntime in one process, nothing else. The median of "
        f"{len(walls)} runs (slides/s of each: "
        f"{', '.join(f'{len(summaries) / w:.2f}' for w in walls)}).",
        "",
        "| slides/s | cells/s | cells | wall | time share | limit slides/s | ratio to limit |",
        "|---|---|---|---|---|---|---|",
        f"| {result['slides_per_s']:.2f} | {result['cells_per_s']:.0f} | {cells} | "
        f"{wall:.1f} s | {shares} · other {result['other_share']:.0%} | {limit:.2f} | "
        f"{result['ratio_to_limit']:.2f} |",
        "",
        "| class | annotated per slide | MAE | mean error | slides exact |",
        "|---|---|---|---|---|",
    ]
    for row in errors.itertuples(index=False):
        lines.append(f"| {row[0]} | {row.annotated_mean:.2f} | {row.mae:.2f} | {row.bias:+.2f} "
                     f"| {row.exact_share:.1%} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
