"""Benchmark: ingest + preprocess of the white-cell data set (~12,500 JPEGs).

Goal: under 2 minutes on the 2-core reference machine. Extracting the
archive is timed separately: it is not part of the pipeline. Prints a markdown
table for the README.

    python bench/ingest_blood_cells.py [--archive PATH] [--sizes 64 224]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

from cellpipe.parallel import default_workers
from cellpipe.stages import ingest as ingest_stage
from cellpipe.stages import preprocess as preprocess_stage

log = logging.getLogger("bench")
DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "blood_cells.tar.gz"
GOAL_SECONDS = 120.0


def machine() -> str:
    """CPU model, usable cores and memory, for the table's caption."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    python = platform.python_version()
    return f"{model}, {default_workers()} cores, {memory_gib:.0f} GiB RAM, Python {python}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.archive.is_file():
        raise SystemExit(f"archive not found: {args.archive} (needs ../shared/datasets)")

    with tempfile.TemporaryDirectory(prefix="cellpipe-bench-") as scratch:
        scratch_dir = Path(scratch)
        started = time.perf_counter()
        with tarfile.open(args.archive) as archive:
            archive.extractall(scratch_dir, filter="data")
        extract_s = time.perf_counter() - started
        source = scratch_dir / "blood_cells" / "images"

        started = time.perf_counter()
        params = ingest_stage.IngestParams(layout="class_folders")
        result = ingest_stage.run(source, scratch_dir / "ingest", params, workers=args.workers)
        ingest_s = time.perf_counter() - started
        rows = result.metrics["rows"]

        lines = [
            f"Machine: {machine()}; {args.workers} worker processes.",
            f"Data: {args.archive.name}, {rows:,} images in the manifest "
            f"({result.metrics['rejected']} rejected), archive extraction {extract_s:.1f} s "
            "(not counted).",
            "",
            "| image size | ingest (decode + sha256) | preprocess (decode + resize) "
            "| total | images/s | goal < 120 s |",
            "|---|---|---|---|---|---|",
        ]
        for size in args.sizes:
            started = time.perf_counter()
            preprocess_stage.run(scratch_dir / "ingest" / "manifest.parquet", source,
                                 scratch_dir / f"pre{size}",
                                 preprocess_stage.PreprocessParams(image_size=size),
                                 workers=args.workers)
            preprocess_s = time.perf_counter() - started
            total = ingest_s + preprocess_s
            verdict = "met" if total < GOAL_SECONDS else "missed"
            lines.append(f"| {size} px | {ingest_s:.1f} s | {preprocess_s:.1f} s | {total:.1f} s "
                         f"| {rows / total:,.0f} | {verdict} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
