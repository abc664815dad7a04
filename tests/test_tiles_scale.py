"""Whole-slide images at scale: tiles decoded by a few threads ahead of inference, a bounded
number of batches at a time, with the same answers as reading them in turn."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage import color

from cellpipe.data.geometry import Box
from cellpipe.serving.client import TritonClassifier
from cellpipe.serving.server import ServerInfo
from cellpipe.slides.readers import SlideReader, TiffSlide
from cellpipe.slides.scoring import ScoreParams, score_slide
from cellpipe.slides.tiles import TileParams, hsv_saturation, prefetch_ordered
from test_serving import exported, server, trained  # noqa: F401 (module fixtures)

FILE_TILE = 256  # the TIFF's own JPEG tiles: the scoring grid (224 px) does not align


def write_pyramid(path: Path, side: int, *, seed: int = 0) -> Path:
    """A JPEG-tiled pyramidal BigTIFF (levels as SubIFDs): a disc of noisy red, green and
    blue bands on white glass, written tile by tile."""
    sides = [side]
    while sides[-1] // 2 >= 512:
        sides.append(sides[-1] // 2)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level_side in enumerate(sides):
            extra = {"subifds": len(sides) - 1} if index == 0 else {"subfiletype": 1}
            tif.write(_disc_tiles(level_side, side, seed), shape=(level_side, level_side, 3),
                      dtype=np.uint8, tile=(FILE_TILE, FILE_TILE), photometric="rgb",
                      compression="jpeg", **extra)
    return path


def _disc_tiles(level_side: int, side: int, seed: int):
    scale = side / level_side
    count = math.ceil(level_side / FILE_TILE)
    colours = np.array([(220, 40, 40), (40, 200, 60), (50, 60, 230)], np.int16)
    offsets = np.arange(FILE_TILE) + 0.5
    for row in range(count):
        y = (row * FILE_TILE + offsets[:, None]) * scale
        for column in range(count):
            x = (column * FILE_TILE + offsets[None, :]) * scale
            inside = (x - side / 2) ** 2 + (y - side / 2) ** 2 <= (0.4 * side) ** 2
            band = np.minimum(2, (3 * x / side).astype(int)) + 0 * y.astype(int)
            rng = np.random.default_rng((seed, level_side, row, column))
            tissue = colours[band] + rng.integers(-40, 40, (FILE_TILE, FILE_TILE, 3))
            yield np.where(inside[..., None], np.clip(tissue, 0, 255), 244).astype(np.uint8)


class ConcurrencyRecorder(SlideReader):
    """A reader passing regions through, counting the reads running at once."""

    def __init__(self, reader: SlideReader) -> None:
        self._reader, self.path = reader, reader.path
        self._lock = threading.Lock()
        self.running = self.most = self.reads = 0

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self._reader.level_dimensions

    def read_region(self, box: Box, *, level: int = 0, page: int = 0) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.reads += 1
            self.most = max(self.most, self.running)
        try:
            return self._reader.read_region(box, level=level, page=page)
        finally:
            with self._lock:
                self.running -= 1


# --- the bounded prefetch, on fake work ----------------------------------------------------


def test_prefetch_keeps_order_and_bounds_the_batches_in_flight() -> None:
    """However slow the consumer, no item starts more than ``ahead`` items past the last
    one handed over, and no more than ``workers`` run at once."""
    lock = threading.Lock()
    handed_over = 0
    started: list[int] = []
    running = most_running = 0
    ahead_of_consumer = []
    all_started = threading.Event()

    def work(item: int) -> int:
        nonlocal running, most_running
        with lock:
            started.append(item)
            ahead_of_consumer.append(item - handed_over)
            running += 1
            most_running = max(most_running, running)
            if len(started) == 4:
                all_started.set()
        threading.Event().wait(0.002)  # overlap the workers
        with lock:
            running -= 1
        return item * item

    results = []
    for result in prefetch_ordered(work, range(40), workers=2, ahead=3):
        if not results:  # hold the first one until the threads have filled the window
            assert all_started.wait(10)
        results.append(result)
        with lock:
            handed_over += 1
    assert results == [i * i for i in range(40)]
    assert sorted(started) == list(range(40))
    assert max(ahead_of_consumer) <= 3
    assert most_running <= 2


def test_prefetch_raises_a_failure_in_turn_and_starts_nothing_after() -> None:
    started: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        if item == 3:
            raise ValueError("corrupt tile")
        return item

    results = []
    with pytest.raises(ValueError, match="corrupt tile"):
        for result in prefetch_ordered(work, range(100), workers=2, ahead=2):
            results.append(result)
    assert results == [0, 1, 2]
    assert max(started) <= 3 + 2


def test_one_worker_reads_in_turn_in_this_thread() -> None:
    """read_workers=1 is the serial path: each item read when asked for, no thread."""
    calls: list[tuple[int, int]] = []
    handed_over = []

    def work(item: int) -> int:
        calls.append((item, len(handed_over)))
        assert threading.current_thread() is threading.main_thread()
        return item

    for result in prefetch_ordered(work, range(5), workers=1, ahead=2):
        handed_over.append(result)
    assert calls == [(i, i) for i in range(5)]


def test_read_workers_default_to_every_core() -> None:
    assert TileParams().read_workers is None
    assert TileParams().decode_threads >= 1
    assert TileParams(read_workers=3).decode_threads == 3
    with pytest.raises(ValueError):
        TileParams(read_workers=-1)


# --- the TIFF reader from several threads ------------------------------------------------


def test_jpeg_tiles_read_in_threads_match_zarr(tmp_path: Path) -> None:
    """Regions cut from the file's JPEG tiles (cached, from four threads) are the pixels
    tifffile's zarr store gives, at every level, across tile edges and the slide's edge."""
    from concurrent.futures import ThreadPoolExecutor

    path = write_pyramid(tmp_path / "slide.tif", 1500)
    rng = np.random.default_rng(0)
    with TiffSlide(path) as reader:
        assert all(page is not None for page in reader._jpeg_tiled)
        requests = []
        for level, (width, height) in enumerate(reader.level_dimensions):
            for _ in range(40):
                x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
                requests.append((level, Box(x0, y0, min(width, x0 + int(rng.integers(1, 400))),
                                            min(height, y0 + int(rng.integers(1, 400))))))
        with ThreadPoolExecutor(4) as pool:
            regions = list(pool.map(lambda r: reader.read_region(r[1], level=r[0]), requests))
        for (level, box), region in zip(requests, regions, strict=True):
            expected = np.asarray(reader._levels[level].array[box.y0:box.y1, box.x0:box.x1])
            assert region.shape == (box.height, box.width, 3)
            np.testing.assert_array_equal(region, expected)


# --- a whole slide through Triton --------------------------------------------------------


@pytest.mark.slow
def test_parallel_decoding_scores_a_pyramid_as_serial_reading_does(
        server: tuple[ServerInfo, Path], tmp_path: Path) -> None:  # noqa: F811
    """An 8192² pyramidal BigTIFF scored with two decoding threads and with one: the same
    tiles in the same order with the same probabilities; reads at once never above two."""
    info, _ = server
    path = write_pyramid(tmp_path / "slide.tif", 8192)
    objects = {}
    with TritonClassifier(info.grpc_url, protocol="grpc") as client:
        for workers in (1, 2):
            params = ScoreParams(mode="tiles", overlay=False,
                                 tiles=TileParams(read_workers=workers))
            with TiffSlide(path) as tiff:
                reader = ConcurrencyRecorder(tiff)
                objects[workers] = score_slide(reader, client, params).objects
            assert reader.most <= workers
            assert reader.reads == len(objects[workers]) + 1  # + the tissue mask's overview
    assert len(objects[1]) > 500  # ~π·0.4² of 37² tiles: the disc, not the glass
    assert set(objects[1]["class"]) == {"red", "green", "blue"}
    pd.testing.assert_frame_equal(objects[2], objects[1], check_exact=True)


def test_tissue_saturation_equals_scikit_image() -> None:
    """The tissue mask's saturation is rgb2hsv's, to the bit, black and grey pixels too."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    rgb[0, :8] = 0       # black: no division by zero
    rgb[1, :8] = 128     # grey: no spread
    assert np.array_equal(hsv_saturation(rgb), color.rgb2hsv(rgb)[..., 1])
    as_float = rgb / 255.0
    assert np.array_equal(hsv_saturation(as_float), color.rgb2hsv(as_float)[..., 1])
