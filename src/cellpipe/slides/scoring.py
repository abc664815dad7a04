"""Score one slide: read → find objects → infer → post-process, with timings per phase.

The classifier is anything with a ``contract`` and ``classify_images`` (the Triton client
in production, onnxruntime in-process for checks). Every object is cropped with the
geometry ingest cut the training objects with, which the model's contract carries, and
fitted to the model's input as preprocess did (``fit_to_contract``), so the served model
sees what it learned from.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from pydantic import Field, model_validator
from tqdm import tqdm

from cellpipe.contract import ModelContract, fit_to_contract
from cellpipe.data.geometry import Box, cut
from cellpipe.params import StageParams
from cellpipe.slides.cells import CellFinderParams, FoundCell, find_cells
from cellpipe.slides.readers import SlideReader
from cellpipe.slides.tiles import TileParams, prefetch_ordered, tissue_tiles

# Distinct colours for classes in overlays (tab10), cycled past ten classes.
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def class_colours(class_names: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    """Each class's colour in overlays, reports and QuPath annotations, by its index."""
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(class_names)}


class ImageClassifier(Protocol):
    """What scoring needs from a model: its contract and probabilities for fitted images."""

    contract: ModelContract
    model_name: str
    model_version: str

    def classify_images(self, images: np.ndarray) -> np.ndarray: ...


class ScoreParams(StageParams):
    """How slides are cut and scored (``score:`` in params.yaml)."""

    mode: Literal["cells", "tiles"] = "cells"
    cells: CellFinderParams = CellFinderParams()
    tiles: TileParams = TileParams()
    nucleated_classes: tuple[str, ...] = Field(
        ("WBC",), description="classes only a stained object can be (a white cell has a nucleus)")
    merge_overlap: float = Field(0.3, gt=0, le=1,
                                 description="stained objects of one class overlapping this "
                                             "share of the smaller box are one cell")
    part_inside: float = Field(0.6, gt=0, le=1,
                               description="unstained objects this much inside a nucleated "
                                           "cell's box are part of it")
    window: int = Field(4096, ge=256, description="cells mode reads the slide in windows this big")
    overlay: bool = Field(True, description="draw the overlay picture (and its thumbnail for "
                                            "report.html); false saves the time")
    overlay_size: int = Field(2048, ge=64, description="longest side of the overlay picture")
    overlay_format: Literal["jpeg", "png"] = Field(
        "jpeg", description="jpeg: overlay.jpg at quality 90 without chroma subsampling (what "
                            "people look at: 2x faster to write and 6x smaller than png); "
                            "png: overlay.png, lossless")
    # A frozen server holds a batch for at most (retries + 1) × timeout + backoff (~47 s).
    request_timeout_s: float = Field(15.0, gt=0, description="seconds one Triton request may "
                                                             "take before it counts as failed")
    retries: int = Field(2, ge=0, description="retries of a failed Triton request before the "
                                              "batch stops (the slide stays pending)")
    follow_links_out: bool = Field(False, description="score symbolic links that resolve "
                                                      "outside the inbox (refused by default)")
    workers: int | None = Field(None, ge=0, description="processes scoring slides at once "
                                                        "(None or 0: every core; 1: in this "
                                                        "process)")

    @model_validator(mode="before")
    @classmethod
    def _no_restated_contract(cls, data: object) -> object:
        """Name the keys that moved into the model contract instead of "extra field"."""
        moved = sorted(set(data) & _MOVED_TO_CONTRACT) if isinstance(data, dict) else []
        if moved:
            raise ValueError(
                f"score.{', score.'.join(moved)}: the crop geometry now comes from the served "
                "model's contract (ingest.voc.pad_fraction / square / border at training "
                "time); delete these keys from the score section")
        return data


_MOVED_TO_CONTRACT = {"pad_fraction", "border", "square"}


@dataclass
class SlideResult:
    """What scoring one slide produced, before it is written."""

    objects: pd.DataFrame
    counts: dict[str, int]
    timings: dict[str, float]
    overlays: dict[str, Image.Image] = field(default_factory=dict)
    overlay_format: Literal["jpeg", "png"] = "jpeg"


class _Timer:
    """Seconds spent per phase, summed over windows."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"read": 0.0, "find": 0.0, "infer": 0.0}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def score_slide(reader: SlideReader, classifier: ImageClassifier,
                params: ScoreParams) -> SlideResult:
    """Every object of every page of ``reader``, classified; counts, timings and overlays."""
    timer = _Timer()
    frames = []
    for page in range(reader.pages):
        if params.mode == "cells":
            frames.append(_score_cells(reader, page, classifier, params, timer))
        else:
            frames.append(_score_tiles(reader, page, classifier, params, timer))
    objects = _objects_table(frames, classifier)
    overlays = {}
    if params.overlay:
        with timer.phase("overlay"):
            overlays = {(f"overlay_p{page}" if page else "overlay"):
                        draw_overlay(reader, objects[objects["page"] == page], page, params,
                                     classifier.contract.class_names)
                        for page in range(reader.pages)}
    names = classifier.contract.class_names
    counts = {name: int((objects["class"] == name).sum()) for name in names}
    return SlideResult(objects, counts, timer.seconds, overlays, params.overlay_format)


# --- cells -----------------------------------------------------------------------------


def _score_cells(reader: SlideReader, page: int, classifier: ImageClassifier,
                 params: ScoreParams, timer: _Timer) -> pd.DataFrame:
    """Find, crop and classify cells window by window, so a huge slide is never whole."""
    contract = classifier.contract
    margin = round(2 * params.cells.cell_diameter)  # a cell on a window edge is whole in one
    width, height = reader.dimensions
    boxes: list[Box] = []
    stained: list[bool] = []
    probabilities = []
    for core in _windows(width, height, params.window):
        read_box = Box(max(0, core.x0 - margin), max(0, core.y0 - margin),
                       min(width, core.x1 + margin), min(height, core.y1 + margin))
        with timer.phase("read"):
            field_rgb = reader.read_region(read_box, page=page)
        with timer.phase("find"):
            cells = [cell for cell in find_cells(field_rgb, params.cells)
                     if _centre_inside(cell.box, core, read_box)]
            crops = [_crop(field_rgb, cell, contract) for cell in cells]
        if not cells:
            continue
        with timer.phase("infer"):
            probabilities.append(classifier.classify_images(np.stack(crops)))
        boxes += [Box(c.box.x0 + read_box.x0, c.box.y0 + read_box.y0,
                      c.box.x1 + read_box.x0, c.box.y1 + read_box.y0) for c in cells]
        stained += [cell.source == "stained" for cell in cells]
    if not boxes:
        return _frame([], np.zeros((0, len(contract.class_names))), page, contract)
    scores = np.concatenate(probabilities)
    labels, keep = resolve_cells(boxes, np.array(stained), scores, contract.class_names, params)
    kept = [box for box, k in zip(boxes, keep, strict=True) if k]
    return _frame(kept, scores[keep], page, contract, labels=labels[keep])


def resolve_cells(boxes: list[Box], stained: np.ndarray, probabilities: np.ndarray,
                  class_names: tuple[str, ...],
                  params: ScoreParams) -> tuple[np.ndarray, np.ndarray]:
    """Class per object and which objects to keep, from the detector's evidence.

    * An object without stain cannot be a nucleated class: it takes its most probable
      other class (a red cell touching a white cell looks partly white in its crop).
    * Stained objects of one class that overlap by ``merge_overlap`` of the smaller box
      are the lobes of one cell: the larger box is kept.
    * Unstained objects lying ``part_inside`` within a nucleated cell's box are pieces of
      its cytoplasm.
    """
    allowed = probabilities.copy()
    nucleated = [class_names.index(name) for name in params.nucleated_classes
                 if name in class_names]
    if nucleated and len(nucleated) < len(class_names):
        allowed[np.ix_(~stained, nucleated)] = -1.0
    labels = allowed.argmax(1)
    keep = np.ones(len(boxes), bool)
    order = sorted(range(len(boxes)), key=lambda i: -_area(boxes[i]))
    for position, larger in enumerate(order):
        if not keep[larger] or not stained[larger]:
            continue
        for smaller in order[position + 1:]:
            if (keep[smaller] and stained[smaller] and labels[smaller] == labels[larger]
                    and _overlap(boxes[larger], boxes[smaller]) >= params.merge_overlap):
                keep[smaller] = False
    # Unstained pieces lying mostly inside a nucleated cell are its pale cytoplasm.
    for whole in (i for i in range(len(boxes)) if keep[i] and labels[i] in nucleated):
        for part in np.flatnonzero(keep & ~stained):
            if _inside(boxes[part], boxes[whole]) >= params.part_inside:
                keep[part] = False
    return labels, keep


def _crop(field_rgb: np.ndarray, cell: FoundCell, contract: ModelContract) -> np.ndarray:
    height, width = field_rgb.shape[:2]
    box = contract.crop_geometry.crop(cell.box, width, height)  # as ingest cut training cells
    return fit_to_contract(cut(field_rgb, box, fill=contract.pad_value), contract)


def _windows(width: int, height: int, size: int) -> Iterator[Box]:
    for y in range(0, height, size):
        for x in range(0, width, size):
            yield Box(x, y, min(x + size, width), min(y + size, height))


def _centre_inside(box: Box, core: Box, read_box: Box) -> bool:
    """Whether a cell found in ``read_box`` belongs to ``core`` (each cell to one window)."""
    centre_x = read_box.x0 + (box.x0 + box.x1) / 2
    centre_y = read_box.y0 + (box.y0 + box.y1) / 2
    return core.x0 <= centre_x < core.x1 and core.y0 <= centre_y < core.y1


def _area(box: Box) -> int:
    return box.width * box.height


def _inside(part: Box, whole: Box) -> float:
    """Share of ``part``'s area inside ``whole``."""
    return _overlap(part, whole) if _area(part) <= _area(whole) else 0.0


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / min(_area(a), _area(b))


# --- tiles -----------------------------------------------------------------------------


def _score_tiles(reader: SlideReader, page: int, classifier: ImageClassifier,
                 params: ScoreParams, timer: _Timer, batch: int = 64) -> pd.DataFrame:
    """Classify the page's tissue tiles batch by batch, the next batches decoded meanwhile.

    ``timings["read"]`` sums the seconds the reading threads spent (with several, more than
    the wall time it overlaps); ``timings["read_wait"]`` is the time classification stood
    waiting for tiles, which is what reading still costs the slide.
    """
    contract = classifier.contract
    with timer.phase("find"):
        tiles = tissue_tiles(reader, params.tiles, page=page)
    level = params.tiles.level

    def read(batch_tiles: list[Box]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        images = np.stack([fit_to_contract(reader.read_region(tile, level=level, page=page),
                                           contract) for tile in batch_tiles])
        return images, time.perf_counter() - started

    workers = params.tiles.decode_threads
    batches = [tiles[start:start + batch] for start in range(0, len(tiles), batch)]
    probabilities = []
    # Two batches per thread: one being decoded, one ready when the model asks for it.
    # More would only hold memory, since inference then waits on nothing.
    decoded = prefetch_ordered(read, batches, workers=workers, ahead=2 * workers)
    slide = getattr(reader, "path", None)
    bar = tqdm(total=len(tiles), desc=f"{slide.name if slide else 'slide'} p{page} tiles",
               unit="tile", disable=None, leave=False, dynamic_ncols=True)
    # closing(): when inference fails, the threads stop reading before the error goes on.
    with bar, closing(decoded):
        while True:
            with timer.phase("read_wait"):
                images, seconds = next(decoded, (None, 0.0))
            if images is None:
                break
            timer.seconds["read"] += seconds
            with timer.phase("infer"):
                probabilities.append(classifier.classify_images(images))
            bar.update(len(images))
    scale = reader.downsample(level)
    level0 = [Box(round(t.x0 * scale), round(t.y0 * scale), round(t.x1 * scale),
                  round(t.y1 * scale)) for t in tiles]
    scores = np.concatenate(probabilities) if probabilities else \
        np.zeros((0, len(contract.class_names)), np.float32)
    return _frame(level0, scores, page, contract)


# --- results -----------------------------------------------------------------------------


def _frame(boxes: list[Box], probabilities: np.ndarray, page: int, contract: ModelContract,
           labels: np.ndarray | None = None) -> pd.DataFrame:
    """One page's objects: box, class, confidence and every class's probability."""
    names = contract.class_names
    probabilities = np.asarray(probabilities, np.float32).reshape(len(boxes), len(names))
    if labels is None:
        labels = probabilities.argmax(1)
    corners = np.array([(b.x0, b.y0, b.x1, b.y1) for b in boxes], np.int64).reshape(-1, 4)
    # Built from whole columns at once: a slide has few objects, so pandas' per-call cost,
    # not the data, is what a column-by-column frame would spend its time on.
    columns = {
        "page": np.full(len(boxes), page, np.int32),
        "x0": corners[:, 0], "y0": corners[:, 1], "x1": corners[:, 2], "y1": corners[:, 3],
        "class": pd.Series([names[i] for i in labels], dtype=object),
        "confidence": probabilities[np.arange(len(labels)), labels],
        **{f"p_{name}": probabilities[:, index] for index, name in enumerate(names)},
    }
    return pd.DataFrame(columns)


def _objects_table(frames: list[pd.DataFrame], classifier: ImageClassifier) -> pd.DataFrame:
    """Every page's objects, numbered, with their centres and the model that scored them."""
    objects = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    corners = objects[["x0", "y0", "x1", "y1"]].to_numpy()
    columns = {
        "object_id": np.arange(len(objects), dtype=np.int64),
        **{name: objects[name].to_numpy() for name in ("page", "x0", "y0", "x1", "y1")},
        "centroid_x": ((corners[:, 0] + corners[:, 2]) / 2).astype(np.float32),
        "centroid_y": ((corners[:, 1] + corners[:, 3]) / 2).astype(np.float32),
        **{name: objects[name] for name in objects.columns[5:]},
    }
    table = pd.DataFrame(columns)
    table["model_name"] = classifier.model_name
    table["model_version"] = str(classifier.model_version)
    return table


def draw_overlay(reader: SlideReader, objects: pd.DataFrame, page: int, params: ScoreParams,
                 class_names: tuple[str, ...]) -> Image.Image:
    """The page's overview with each object's box (cells) or a tinted square (tiles) in its
    class colour, and a legend with the counts."""
    overview, scale = reader.overview(params.overlay_size, page=page)
    image = Image.fromarray(overview).convert("RGBA")
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    colours = class_colours(class_names)
    line = max(1, round(2 * max(image.size) / 1024))
    columns = ["x0", "y0", "x1", "y1", "class", "confidence"]
    for x0, y0, x1, y1, name, confidence in objects[columns].itertuples(index=False, name=None):
        box = [x0 * scale, y0 * scale, max(x0 * scale, x1 * scale - 1),
               max(y0 * scale, y1 * scale - 1)]
        if params.mode == "tiles":  # a heatmap: tint ∝ the winning class's probability
            draw.rectangle(box, fill=(*colours[name], round(160 * float(confidence))))
        else:
            draw.rectangle(box, outline=(*colours[name], 255), width=line)
    image = Image.alpha_composite(image, layer)
    _legend(ImageDraw.Draw(image), objects, colours)
    return image.convert("RGB")


def _legend(draw: ImageDraw.ImageDraw, objects: pd.DataFrame,
            colours: dict[str, tuple[int, int, int]]) -> None:
    y = 4
    for name, colour in colours.items():
        text = f"{name}: {int((objects['class'] == name).sum())}"
        draw.rectangle([4, y, 16, y + 12], fill=colour)
        draw.text((20, y), text, fill=(0, 0, 0), stroke_width=2, stroke_fill=(255, 255, 255))
        y += 16
