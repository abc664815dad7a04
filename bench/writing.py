"""Benchmark: what writing a slide's overlay costs, per way of writing it.

The BCCD test slides are scored once (cells found, a colour rule for classes: the
overlay's cost does not depend on the model), then each slide's overlay is drawn and
saved in every way below, timed per slide. "Looks right" is measured against the
lossless picture: the PSNR of the saved file, and whether every class colour of the
boxes survives (share of box-outline pixels within 40 of their colour).

    python bench/writing.py [--slides 72]

Results in bench/results/writing.md and writing.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cellpipe.contract import ModelContract
from cellpipe.slides.readers import open_slide
from cellpipe.slides.report import save_thumbnail
from cellpipe.slides.scoring import ScoreParams, SlideResult, draw_overlay, score_slide

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "data" / "bccd"
RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("bench.writing")


class ColourRule:
    """Classes from the crop's colour: enough to draw a realistic overlay without a model."""

    model_name, model_version = "colour_rules", "1"
    contract = ModelContract(class_names=("RBC", "WBC", "Platelets"), image_size=16,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        mean = images.reshape(len(images), -1, 3).mean(1)
        blue = mean[:, 2] - mean[:, 0]
        scores = np.stack([-blue, blue - 10, np.full(len(images), -5.0)], axis=1)
        exp = np.exp(scores - scores.max(1, keepdims=True))
        return (exp / exp.sum(1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Way:
    """One way of writing the overlay: its name, file name, and how it saves the picture."""

    name: str
    file: str
    save: Callable[[Image.Image, Path], None] | None  # None: no overlay at all
    overlay_size: int = 2048


WAYS = (
    Way("PNG, zlib level 6 (Pillow's default; before)", "overlay.png",
        lambda image, path: image.save(path, compress_level=6)),
    Way("PNG, zlib level 3", "overlay.png", lambda image, path: image.save(path, compress_level=3)),
    Way("PNG, zlib level 1 (now the default)", "overlay.png",
        lambda image, path: image.save(path, compress_level=1)),
    Way("PNG, zlib level 0 (stored)", "overlay.png",
        lambda image, path: image.save(path, compress_level=0)),
    Way("PNG level 1 at half size (overlay_size 320)", "overlay.png",
        lambda image, path: image.save(path, compress_level=1), overlay_size=320),
    Way("JPEG q90, 4:4:4", "overlay.jpg",
        lambda image, path: image.save(path, quality=90, subsampling=0)),
    Way("JPEG q90, 4:2:0", "overlay.jpg", lambda image, path: image.save(path, quality=90)),
    Way("no overlay (score.overlay: false)", "", None),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=72, help="BCCD test slides to use")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stems = (BCCD / "ImageSets" / "Main" / "test.txt").read_text().split()[:args.slides]
    params = ScoreParams.model_validate({"overlay": False})
    scored = []
    for stem in stems:
        with open_slide(BCCD / "JPEGImages" / f"{stem}.jpg") as reader:
            scored.append((stem, score_slide(reader, ColourRule(), params)))
    rows = [measure(way, scored) for way in WAYS]
    write_tables(rows, len(scored))


def measure(way: Way, scored: list[tuple[str, SlideResult]]) -> dict:
    """Mean ms per slide to draw, save and thumbnail the overlay; size and fidelity."""
    seconds, sizes, psnrs, colours = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="cellpipe-writing-") as folder:
        for stem, result in scored:
            started = time.perf_counter()
            if way.save is None:
                seconds.append(time.perf_counter() - started)
                continue
            params = ScoreParams.model_validate({"overlay_size": way.overlay_size})
            with open_slide(BCCD / "JPEGImages" / f"{stem}.jpg") as reader:
                reference = draw_overlay(reader, result.objects, 0, ScoreParams(),
                                         ColourRule.contract.class_names)
                started = time.perf_counter()
                image = draw_overlay(reader, result.objects, 0, params,
                                     ColourRule.contract.class_names)
            path = Path(folder) / way.file
            way.save(image, path)
            save_thumbnail(image, path.with_name("overlay.thumb.jpg"))
            seconds.append(time.perf_counter() - started)
            sizes.append(path.stat().st_size)
            saved = np.asarray(Image.open(path).convert("RGB").resize(reference.size))
            psnrs.append(_psnr(np.asarray(reference), saved))
            colours.append(_box_colours_kept(np.asarray(reference), saved))
    row = {"way": way.name, "ms_per_slide": round(1000 * float(np.mean(seconds)), 1)}
    if sizes:
        row |= {"kb": round(float(np.mean(sizes)) / 1024, 1),
                "psnr_db": round(float(np.median(psnrs)), 1),
                "box_pixels_kept": round(float(np.mean(colours)), 4)}
    log.info("%s", row)
    return row


def _psnr(reference: np.ndarray, saved: np.ndarray) -> float:
    error = np.mean((reference.astype(float) - saved.astype(float)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255**2 / error)


def _box_colours_kept(reference: np.ndarray, saved: np.ndarray) -> float:
    """Share of the box outlines' pixels (pure palette colours) still within 40 of them."""
    from cellpipe.slides.scoring import PALETTE

    palette = np.array(PALETTE[:3])
    ref = reference.astype(int)
    on_box = np.zeros(ref.shape[:2], bool)
    for colour in palette:
        on_box |= np.all(ref == colour, axis=-1)
    if not on_box.any():
        return 1.0
    distance = np.abs(saved.astype(int)[on_box] - ref[on_box]).max(axis=1)
    return float(np.mean(distance <= 40))


def write_tables(rows: list[dict], slides: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "writing.json").write_text(json.dumps({"slides": slides, "ways": rows},
                                                     indent=2))
    lines = [f"Overlay of {slides} BCCD test slides (640×480): draw + save + 320 px thumbnail, "
             "ms per slide (one process on a shared 2-core machine: noisy). PSNR and box "
             "pixels kept are against the lossless overlay; half size is scaled back up "
             "to compare.", "",
             "| way | ms/slide | KiB | PSNR dB | box pixels kept |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['way']} | {row['ms_per_slide']} | {row.get('kb', '–')} | "
                     f"{row.get('psnr_db', '–')} | {row.get('box_pixels_kept', '–')} |")
    (RESULTS / "writing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
