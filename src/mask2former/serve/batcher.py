"""Dynamic batching: requests that arrive close together share one forward pass.

A worker takes the oldest waiting request, then waits at most `max_wait_s` for more (less when
`max_batch` arrive sooner) and hands the batch to `run_batch` in a thread of its own, so the event loop
keeps accepting and answering requests while the model runs. Each request gets its own result back
through its future. Requests of different tasks in one batch are run as one call per task.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

# run_batch(images [(H, W, 3) uint8], task) -> one result per image, in order.
RunBatch = Callable[[Sequence[np.ndarray], str], Sequence[Any]]


class QueueFullError(Exception):
    """No room for another request: too many are waiting, or the batcher is shutting down."""


@dataclass
class _Job:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    task: str
    future: asyncio.Future


class DynamicBatcher:
    """Batches concurrent `submit` calls into `run_batch` calls of at most `max_batch` images.

    `workers` batches may run at the same time (each in its own thread); `max_queue` bounds the requests
    waiting for a worker; `on_batch(size)` is told the size of every batch run. Create and use it inside
    one running event loop: `start()`, then `submit(...)` from request handlers, `close()` to drain.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or workers < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"max_batch {max_batch}, workers {workers}, max_queue {max_queue} must be at least 1 and "
                f"max_wait_s {max_wait_s} not negative"
            )
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.workers = workers
        self.on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mask2former-model")
        self._tasks: list[asyncio.Task] = []

    @property
    def depth(self) -> int:
        """Requests waiting for a worker (not yet in a batch)."""
        return len(self._jobs)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"batcher-{i}") for i in range(self.workers)]

    async def submit(self, image: np.ndarray, task: str) -> Any:
        """Queue one image; returns its result once its batch has run (run_batch's exception if it failed).

        Raises QueueFullError at once when `max_queue` requests are already waiting or after close().
        Cancelling the caller (e.g. a timeout) drops the request if its batch has not started yet.
        """
        if self._closed:
            raise QueueFullError("the server is shutting down")
        if len(self._jobs) >= self.max_queue:
            raise QueueFullError(f"{len(self._jobs)} requests are already waiting for the model")
        job = _Job(image, task, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._arrived.set()
        return await job.future

    async def close(self) -> None:
        """Refuse new requests, finish every waiting one, stop the workers and their threads."""
        self._closed = True
        self._arrived.set()
        await asyncio.gather(*self._tasks)
        self._executor.shutdown(wait=True)

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Job] | None:
        """Up to max_batch live jobs, after waiting at most max_wait_s from the first; None once closed."""
        loop = asyncio.get_running_loop()
        while not self._jobs:
            if self._closed:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait_s
        while len(self._jobs) < self.max_batch and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        batch = []
        while self._jobs and len(batch) < self.max_batch:
            job = self._jobs.popleft()
            if not job.future.done():  # a request that timed out while waiting is not run
                batch.append(job)
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        by_task: dict[str, list[_Job]] = {}
        for job in batch:
            by_task.setdefault(job.task, []).append(job)
        for task, jobs in by_task.items():
            images = [job.image for job in jobs]
            if self.on_batch is not None:
                self.on_batch(len(jobs))
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, images, task)
            except Exception as error:  # noqa: BLE001 - handed to each request, which reports it
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
