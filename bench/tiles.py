"""Benchmark: score whole-slide images tile by tile (score.mode: tiles) through local Triton.

Needs the demo pipeline's published model (`make demo` or `dvc repro` first). Generates
(in a temporary folder, never committed) JPEG-tiled pyramidal BigTIFFs of a disc of
stained tissue on white glass, at each size asked, and scores each one alone through
``score_inbox`` with ``score.tiles.read_workers`` = 1 (serial decoding, the "before") and
with the default (every core), each run in a fresh process so that its peak RSS is its own.
Reports tiles, wall time, tiles/s, peak RSS and the read/infer time shares.

    python bench/tiles.py [--sizes 24576 49152] [--protocol grpc] [--workers 1 0] [--tag NAME]

``--workers`` lists the read_workers settings to compare (0: the default, every core);
``--tag`` writes tiles_<tag>.md/.json instead of tiles.md/.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from machine import cores, cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TILE = 256  # side of the file's own JPEG tiles, as scanners write them
MIN_LEVEL_SIDE = 1024  # the pyramid stops at the first level below 2 × this
TEXTURES = 16  # distinct tissue textures, rolled per tile: generating stays cheap

log = logging.getLogger("bench.tiles")


# --- the slides ----------------------------------------------------------------------------


def write_disc_slide(path: Path, side: int, *, seed: int = 0, quality: int = 90) -> Path:
    """Write a side × side JPEG-tiled pyramidal BigTIFF: a disc of tissue on white glass.

    Every level is written tile by tile from a generator (level 0 as the first page, the
    others as its SubIFDs, each half the previous), so a 49,152² slide never sits whole
    in memory.
    """
    sides = [side]
    while sides[-1] // 2 >= MIN_LEVEL_SIDE:
        sides.append(sides[-1] // 2)
    textures = _tissue_textures(seed)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level_side in enumerate(sides):
            options = {"shape": (level_side, level_side, 3), "dtype": np.uint8,
                       "tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg",
                       "compressionargs": {"level": quality}}
            if index == 0:
                options["subifds"] = len(sides) - 1
            else:
                options["subfiletype"] = 1  # a reduced-resolution image of the page
            tif.write(_disc_tiles(level_side, side, textures, seed), **options)
    return path


def _tissue_textures(seed: int) -> list[np.ndarray]:
    """Pink stroma with purple nuclei and grain, as H&E looks at 20x."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    textures = []
    for _ in range(TEXTURES):
        tile = np.array((225, 150, 190), np.float32) + rng.normal(0, 12, (TILE, TILE, 3))
        for _ in range(rng.integers(20, 60)):
            cy, cx, radius = rng.integers(0, TILE), rng.integers(0, TILE), rng.integers(3, 8)
            tile[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = (95, 45, 140)
        textures.append(np.clip(tile, 0, 255).astype(np.uint8))
    return textures


def _disc_tiles(level_side: int, side: int, textures: list[np.ndarray],
                seed: int) -> Iterator[np.ndarray]:
    """The level's tiles in row-major order; the disc is 80% of the slide's side."""
    scale = side / level_side  # level-0 px per px of this level
    count = math.ceil(level_side / TILE)
    centre, radius = side / 2, 0.4 * side
    offsets = np.arange(TILE) + 0.5
    glass = np.full((TILE, TILE, 3), 244, np.uint8)
    for row in range(count):
        y = (row * TILE + offsets[:, None]) * scale - centre
        for column in range(count):
            x = (column * TILE + offsets[None, :]) * scale - centre
            inside = x ** 2 + y ** 2 <= radius ** 2
            if not inside.any():
                yield glass
                continue
            rng = np.random.default_rng((seed, level_side, row, column))
            texture = np.roll(textures[rng.integers(TEXTURES)],
                              tuple(rng.integers(0, TILE, 2)), axis=(0, 1))
            yield np.where(inside[..., None], texture, glass)


# --- scoring, one process per run ----------------------------------------------------------


def score_once(slide: Path, url: str, protocol: str, read_workers: int) -> dict:
    """Score ``slide`` alone through ``score_inbox`` in this process; its numbers.

    Run in a fresh (spawned) process per slide and setting, so ``ru_maxrss`` is this
    run's peak alone.
    """
    from cellpipe.params import load_section
    from cellpipe.serving.client import TritonClassifier
    from cellpipe.slides.batch import ModelKey, score_inbox
    from cellpipe.slides.scoring import ScoreParams

    params = load_section(ScoreParams, "score", ROOT / "params.yaml")
    tiles = params.tiles.model_copy(update={"read_workers": read_workers})
    params = params.model_copy(update={"mode": "tiles", "tiles": tiles, "workers": 1})
    with tempfile.TemporaryDirectory(prefix="cellpipe-bench-tiles-") as folder:
        inbox, out = Path(folder) / "inbox", Path(folder) / "results"
        inbox.mkdir()
        _link_or_copy(slide, inbox / slide.name)
        with TritonClassifier(url, protocol=protocol) as client:
            model = ModelKey(client.model_name, client.pin_served_version())
            started = time.perf_counter()
            report = score_inbox(str(inbox), out, client, params, model)
            wall = time.perf_counter() - started
        if report["totals"].get("scored") != 1:
            raise RuntimeError(f"{slide.name} was not scored: {report['totals']}")
        summary = json.loads(next((out / "slides").glob("*/summary.json")).read_text())
    return {"tiles": summary["objects"], "wall_s": wall, "timings": summary["timings"],
            "read_workers": params.tiles.decode_threads,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (the inbox refuses symbolic links out of it), a copy across disks."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)


def _in_child(slide: Path, url: str, protocol: str, read_workers: int) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(score_once, (slide, url, protocol, read_workers))


# --- the run -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[24576, 49152],
                        help="sides of the generated slides, px")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 0],
                        help="score.tiles.read_workers settings (0: every core)")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cellpipe.serving.server import LocalTriton, free_port

    runs = []
    with tempfile.TemporaryDirectory(prefix="cellpipe-bench-") as folder:
        server = LocalTriton(Path(folder) / "triton")
        info = server.start(ROOT / "triton_repo", http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port())
        try:
            for side in args.sizes:
                started = time.perf_counter()
                slide = write_disc_slide(Path(folder) / f"disc_{side}.tif", side)
                log.info("wrote %s (%.0f MB) in %.0f s", slide.name,
                         slide.stat().st_size / 2**20, time.perf_counter() - started)
                for workers in args.workers:
                    run = _in_child(slide, info.url(args.protocol), args.protocol, workers)
                    run |= {"side": side, "setting": workers,
                            "file_mb": round(slide.stat().st_size / 2**20, 1)}
                    log.info("%d px, read_workers=%s: %d tiles in %.1f s", side, workers,
                             run["tiles"], run["wall_s"])
                    runs.append(run)
                slide.unlink()
        finally:
            server.stop()
    write_tables(runs, args)


def write_tables(runs: list[dict], args: argparse.Namespace) -> None:
    machine = f"{cpu_name()}, {cores()} cores"
    load = os.getloadavg()
    rows = []
    for run in runs:
        timings = run["timings"]
        rows.append({
            "side": run["side"], "file_mb": run["file_mb"], "read_workers": run["read_workers"],
            "setting": "serial" if run["setting"] == 1 else f"{run['setting'] or 'default'}",
            "tiles": run["tiles"], "wall_s": round(run["wall_s"], 2),
            "tiles_per_s": round(run["tiles"] / run["wall_s"], 1),
            "peak_rss_mb": round(run["peak_rss_mb"]),
            # read: seconds the decoding threads spent (summed over threads); read_wait:
            # the part inference stood waiting for them.
            "share": {phase: round(timings.get(phase, 0.0) / run["wall_s"], 4)
                      for phase in ("find", "read", "read_wait", "infer", "overlay")},
        })
    result = {"machine": machine, "protocol": args.protocol,
              "load_average_after": [round(x, 2) for x in load], "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    name = f"tiles_{args.tag}" if args.tag else "tiles"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Generated JPEG-tiled (256 px, quality 90) pyramidal BigTIFFs, a disc of tissue 80% "
        f"of the side; tiles mode (224 px tiles, level 0, overlay on), one slide per run in a "
        f"fresh process, Triton {args.protocol} on 127.0.0.1 with the demo's model; {machine}; "
        f"load average after the runs {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        "(1/5/15 min, other users included). *read* sums the decoding threads' seconds (above "
        "100% of wall when they overlap); *wait* is the time inference stood waiting for "
        "tiles.",
        "",
        "| slide | read_workers | tiles | wall | tiles/s | peak RSS | find | read | wait "
        "| infer | overlay |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        share = row["share"]
        label = "1 (serial)" if row["setting"] == "serial" else \
            f"{row['read_workers']} ({row['setting']})"
        lines.append(
            f"| {row['side']}² ({row['file_mb']:.0f} MB) | {label} | {row['tiles']} | "
            f"{row['wall_s']:.1f} s | {row['tiles_per_s']:.0f} | {row['peak_rss_mb']} MB | "
            + " | ".join(f"{share[p]:.0%}" for p in ("find", "read", "read_wait", "infer",
                                                      "overlay")) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
