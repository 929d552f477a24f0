"""Threads for evaluation: read and score files on several cores, score images while the model runs.

PNG decoding (PIL, imagecodecs) and numpy's whole-array passes release the GIL, so threads use every core
without pickling images between processes. Results are consumed in input order, so the accumulated
statistics equal a single-threaded pass bit for bit, and the first error raised is the first one in order.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Threads for file scoring: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """function(item) for every item, computed on `workers` threads (default: default_workers()), yielded in
    the order of items. At most 2 x workers items are in flight. An exception is raised when its item's turn
    comes; the items not started yet are then dropped."""
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers {workers}: must be at least 1")
    if workers == 1:
        yield from map(function, items)
        return
    pending: list[Future] = []
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evaluation") as pool:
        try:
            for item in iterator:
                pending.append(pool.submit(function, item))
                if len(pending) >= 2 * workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()


class BackgroundScorer:
    """One thread that runs score(item) for each item put, in order, while the caller does other work (the
    model's next image). Bounded: put blocks when `depth` items wait. An exception in score stops the thread
    and is raised again by the next put or by finish."""

    _DONE = object()

    def __init__(self, score: Callable[[Any], None], depth: int = 4):
        self._score = score
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="evaluation-scorer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if self._error is not None:
                continue  # drain what is queued; the caller raises the error
            try:
                self._score(item)
            except BaseException as error:  # handed to the caller's thread
                self._error = error

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, item: Any) -> None:
        """Queue one item for scoring (raises the scorer's error, if it failed on an earlier item)."""
        self._raise_error()
        self._queue.put(item)

    def finish(self) -> None:
        """Wait until every queued item is scored; raise the scorer's error if there was one."""
        self._queue.put(self._DONE)
        self._thread.join()
        self._raise_error()

    def close(self) -> None:
        """Stop the thread without raising (for cleanup after an error elsewhere)."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("closed")
            self._queue.put(self._DONE)
            self._thread.join()
