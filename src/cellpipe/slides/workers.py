"""Score slides in worker processes, with their crops classified together in this one.

Each worker reads, segments, crops and writes whole slides through the very function the
sequential batch uses (:func:`cellpipe.slides.batch.score_and_write`), so every per-slide
guarantee (atomic results, quarantine, skipping what is done) holds unchanged, and the
results are the same. Only classification differs: a worker's classifier is a stand-in
(:class:`_RemoteClassifier`) that sends its crops to this process, where one thread
(:class:`_Batcher`) gathers the requests of every worker that is waiting into one batch
for the one real classifier (the Triton client), so the server sees a few large requests
rather than one small request per slide window.

Workers are spawned (never forked: the Triton client holds threads and sockets) and die
with this process (``PR_SET_PDEATHSIG``), so a batch killed with SIGKILL leaves no worker
behind to finish a result while the rerun is already scoring.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import fsspec
import numpy as np
from tqdm import tqdm

from cellpipe.contract import ModelContract
from cellpipe.redact import install_log_redaction
from cellpipe.slides.batch import (
    InboxSlide,
    ModelKey,
    ScoringStopped,
    ServerFailed,
    SlideOutcome,
    score_and_write,
)
from cellpipe.slides.scoring import ImageClassifier, ScoreParams

log = logging.getLogger(__name__)

# Slides queued per worker beyond the one it scores: enough that no worker waits for the
# next slide, few enough that a stopped batch has little to cancel.
_QUEUED_PER_WORKER = 1
# The most crops sent to the classifier at once (the Triton client splits them further).
_MAX_BATCH = 1024
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class _Request:
    """Crops from one worker (``slot``) waiting for their probabilities."""

    slot: int
    images: np.ndarray


def score_in_workers(fs: fsspec.AbstractFileSystem, slides: list[InboxSlide], out: Path,
                     classifier: ImageClassifier, params: ScoreParams, model: ModelKey,
                     *, workers: int, outcomes: list[SlideOutcome]) -> None:
    """Score ``slides`` in ``workers`` processes; append their outcomes to ``outcomes`` in
    inbox order.

    Raises :class:`ScoringStopped` when the server or the results disk failed: no slide
    is started after that, the ones in flight end (scored or failing fast), and
    ``outcomes`` holds every slide that finished, so the caller can report the stopped run.
    """
    try:
        contract = classifier.contract  # may be the client's first request to the server
    except Exception as error:
        raise ServerFailed(f"{error} (before the first slide)") from error
    context = multiprocessing.get_context("spawn")
    requests = context.Queue()
    responses = [context.Queue() for _ in range(workers)]
    slots = context.Queue()
    for slot in range(workers):
        slots.put(slot)
    log_records = context.Queue()
    batcher = _Batcher(classifier, requests, responses)
    finished: dict[int, SlideOutcome] = {}
    with _forward_logs(log_records), batcher.running(), ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker,
            initargs=(os.getpid(), contract, (classifier.model_name, classifier.model_version),
                      requests, responses, slots,
                      log_records, logging.getLogger().getEffectiveLevel())) as pool:
        stopped = _run_pool(pool, fs, slides, out, params, model, workers, batcher, finished)
    outcomes.extend(finished[index] for index in sorted(finished))
    if stopped is not None:
        raise stopped


def _run_pool(pool: ProcessPoolExecutor, fs: fsspec.AbstractFileSystem,
              slides: list[InboxSlide], out: Path, params: ScoreParams, model: ModelKey,
              workers: int, batcher: _Batcher,
              finished: dict[int, SlideOutcome]) -> ScoringStopped | None:
    """Keep every worker busy with a bounded queue of slides; collect their outcomes.

    Returns the first server or disk failure, after which no slide is started.
    """
    todo = iter(enumerate(slides))
    running: dict[Future[SlideOutcome], int] = {}
    stopped: ScoringStopped | None = None

    def submit_next() -> None:
        for index, slide in todo:
            running[pool.submit(_score_one, fs, slide, out, params, model)] = index
            return

    for _ in range(workers * (1 + _QUEUED_PER_WORKER)):
        submit_next()
    with tqdm(total=len(slides), desc="score slides", unit="slide") as bar:
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    if future.cancelled():
                        continue
                    try:
                        finished[index] = future.result()
                    except ScoringStopped as error:
                        if stopped is None:  # start no other slide; let those in flight end
                            stopped = error
                            _cancel_queued(running)
                    bar.update()
                    if stopped is None:
                        submit_next()
        except BaseException:  # an interrupt, or a worker that died: start nothing more
            _cancel_queued(running)
            raise
    return stopped


def _cancel_queued(running: dict[Future[SlideOutcome], int]) -> None:
    """Cancel the slides no worker has started (those already started run to their end)."""
    for future in running:
        future.cancel()


@contextmanager
def _forward_logs(records: multiprocessing.Queue) -> Iterator[None]:
    """Workers' log records, handled by this process's handlers (format, redaction)."""
    listener = logging.handlers.QueueListener(records, *logging.getLogger().handlers,
                                              respect_handler_level=True)
    listener.start()
    try:
        yield
    finally:
        listener.stop()


class _Batcher:
    """Classifies the crops workers send, gathered across workers into large batches.

    Each call takes every request waiting at that moment (those that arrived while the
    previous call ran), classifies them together and sends each worker its rows: as
    Triton's dynamic batcher, it never waits for a batch to fill, so no worker idles for
    the sake of a bigger request. Once the classifier fails, every request gets that
    failure at once: the batch is stopping, and retrying the server would only delay it.
    """

    def __init__(self, classifier: ImageClassifier, requests: multiprocessing.Queue,
                 responses: list[multiprocessing.Queue]) -> None:
        self._classifier, self._requests, self._responses = classifier, requests, responses
        self._failure: str | None = None

    @contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self._serve, name="crop-batcher", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._requests.put(None)
            thread.join()

    def _serve(self) -> None:
        while (batch := self._gather()) is not None:
            self._classify(batch)

    def _gather(self) -> list[_Request] | None:
        """The next requests to classify together; None once asked to stop."""
        first = self._requests.get()
        if first is None:
            return None
        batch = [first]
        size = len(first.images)
        while size < _MAX_BATCH:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            if request is None:  # stop after answering what is here
                self._requests.put(None)
                break
            batch.append(request)
            size += len(request.images)
        return batch

    def _classify(self, batch: list[_Request]) -> None:
        if self._failure is None:
            try:
                probabilities = self._classifier.classify_images(
                    np.concatenate([request.images for request in batch]))
            except Exception as error:  # noqa: BLE001 (sent to the worker: ServerFailed there)
                self._failure = str(error)
        if self._failure is not None:
            for request in batch:
                self._responses[request.slot].put((False, self._failure))
            return
        start = 0
        for request in batch:
            stop = start + len(request.images)
            self._responses[request.slot].put((True, probabilities[start:stop]))
            start = stop


# --- in a worker process -----------------------------------------------------------------


class _ClassifierFailed(Exception):
    """The parent's classifier failed; ``score_and_write`` raises it as ServerFailed."""


class _RemoteClassifier:
    """A worker's classifier: the parent's, asked through queues (see :class:`_Batcher`)."""

    def __init__(self, contract: ModelContract, model: tuple[str, str], slot: int,
                 requests: multiprocessing.Queue, response: multiprocessing.Queue) -> None:
        self.contract = contract
        self.model_name, self.model_version = model  # the parent classifier's, as it says them
        self._slot, self._requests, self._response = slot, requests, response

    def classify_images(self, images: np.ndarray) -> np.ndarray:
        self._requests.put(_Request(self._slot, images))
        ok, value = self._response.get()
        if not ok:
            raise _ClassifierFailed(value)
        return value


_classifier: _RemoteClassifier | None = None  # this worker's, set by _start_worker


def _start_worker(parent: int, contract: ModelContract, model: tuple[str, str],
                  requests: multiprocessing.Queue, responses: list[multiprocessing.Queue],
                  slots: multiprocessing.Queue, log_records: multiprocessing.Queue,
                  log_level: int) -> None:
    """Initialise a worker: die with the parent, log through it, take a response slot."""
    global _classifier
    _die_with(parent)
    # One OpenCV thread (cell finding): the workers are what fills the cores, and OpenCV's
    # own pool per worker on top of them only oversubscribes the machine.
    cv2.setNumThreads(1)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_records)]
    root.setLevel(log_level)
    install_log_redaction()
    slot = slots.get()
    _classifier = _RemoteClassifier(contract, model, slot, requests, responses[slot])


def _die_with(parent: int) -> None:
    """Be killed when the parent dies, even by SIGKILL (Linux), so no orphan writes on."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _score_one(fs: fsspec.AbstractFileSystem, slide: InboxSlide, out: Path,
               params: ScoreParams, model: ModelKey) -> SlideOutcome:
    """One slide, in a worker, as the sequential batch scores it."""
    assert _classifier is not None, "worker not initialised"
    return score_and_write(fs, slide, out, _classifier, params, model)
