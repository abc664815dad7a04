"""Ordered parallel map over processes, with a progress bar."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")

# Below this many items a process pool costs more to start than it saves.
_MIN_ITEMS_FOR_POOL = 64


def default_workers() -> int:
    """Worker processes to use by default: every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_ordered(function: Callable[[T], R], items: Sequence[T], *, workers: int,
                desc: str, unit: str = "file") -> Iterator[R]:
    """Yield ``function(item)`` for each item, in input order.

    ``function`` must be a module-level function (it is pickled to the workers).
    The bar is hidden when stderr is not a terminal, so CI logs stay readable.
    """
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=None, dynamic_ncols=True)
    with bar:
        if workers <= 1 or len(items) < _MIN_ITEMS_FOR_POOL:
            for item in items:
                yield function(item)
                bar.update()
            return
        chunksize = max(1, min(64, len(items) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(function, items, chunksize=chunksize):
                yield result
                bar.update()
