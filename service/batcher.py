"""Dynamic batching of ``POST /segment``: requests that arrive close together share one runtime call.

As Triton's dynamic batcher does (reference/serving.md), the first request waiting for the model opens a
window of ``window_s``; requests for the same runtime that arrive within it join its batch, which runs
when the window closes or when it holds ``max_size`` images, whichever comes first, so a request waits at
most the window for others. Unlike Triton, the batcher knows which requests are on their way (admitted,
still reading or decoding their image: :meth:`Batcher.on_the_way`), so a window also closes as soon as
none is: a lone request runs at once instead of waiting for arrivals that cannot come. A batch
runs as soon as one of ``runs`` model runs is free; while all are busy, requests keep queueing and the
next free run takes the oldest ones at once (their window is over), which is how batches grow under
load. Each queued image is already letterboxed onto its runtime's canvas (N, 3, H, W per batch), so
images of any size batch together, and a batch only ever holds requests leased to one runtime (one model
version): during a swap the old and the new version batch separately.

The batcher lives on the event loop; the runtime call runs in one of the batcher's own ``runs`` threads,
so waiting never holds a thread and inference never holds the loop. A failed call fails every request of
its batch with the runtime's exception. Throughput and latency with and without batching: BENCHMARKS.md,
Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from export.runtime import SegmentationRuntime
from service.metrics import SEGMENT_BATCH_SIZE, SEGMENT_BATCH_WAIT
from service.model_server import RETRY_SOON_S, NoModelLoaded


@dataclass
class _Waiting:
    """One request's image waiting for its batch.

    Attributes:
        image: Normalised image on the runtime's canvas, float32 (3, H, W).
        arrived: When it was queued (``time.monotonic()``: uvloop's ``loop.time()`` has 1 ms steps).
        answer: Resolved with its label map, uint8 (H, W).
    """

    image: np.ndarray
    arrived: float
    answer: asyncio.Future[np.ndarray] = field(repr=False)


def _run_batch(runtime: SegmentationRuntime, batch: list[_Waiting]) -> np.ndarray:
    """Label maps uint8 (N, H, W) of the batch's images, in one runtime call (in a run thread)."""
    started = time.monotonic()
    for waiting in batch:
        SEGMENT_BATCH_WAIT.observe(started - waiting.arrived)
    SEGMENT_BATCH_SIZE.observe(len(batch))
    return runtime.predict_labels(np.stack([waiting.image for waiting in batch]))  # (N, 3, H, W) -> (N, H, W)


class Batcher:
    """Groups the model calls of concurrent ``/segment`` requests into batches per runtime.

    Args:
        window_s: Longest time the first request of a batch waits for requests on their way (0: only
            those waiting).
        max_size: Most images per runtime call (1: no batching); a runtime's own ``max_batch`` caps it too.
        runs: Runtime calls at once (threads of the batcher).
    """

    def __init__(self, window_s: float, max_size: int, runs: int) -> None:
        self.window_s = window_s
        self.max_size = max_size
        self.runs = runs
        self._queues: dict[SegmentationRuntime, deque[_Waiting]] = {}
        self._on_the_way = 0
        self._arrival = asyncio.Event()
        self._free_runs = asyncio.Semaphore(runs)
        self._executor = ThreadPoolExecutor(runs, thread_name_prefix="incseg-batch")
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._stopped = False

    @contextlib.contextmanager
    def on_the_way(self) -> Iterator[None]:
        """Marks a request that will ask for :meth:`labels` once its image is decoded.

        While any request is on its way, an open window waits for it (at most ``window_s``); once none is,
        the window closes: nothing else can join in time. Leave the block right before calling
        :meth:`labels` (no ``await`` in between), or on failure.
        """
        self._on_the_way += 1
        try:
            yield
        finally:
            self._on_the_way -= 1
            self._arrival.set()  # a window that waited for this request may close now

    async def labels(self, runtime: SegmentationRuntime, image: np.ndarray) -> np.ndarray:
        """The label map uint8 (H, W) of one normalised image float32 (3, H, W) on ``runtime``'s canvas.

        The caller holds a lease on ``runtime`` until this returns.

        Raises:
            NoModelLoaded: The batcher is stopping (the API process shuts down; retry elsewhere or later).
            Exception: Whatever the runtime call of the image's batch raised.
        """
        if self._stopped:
            raise _stopping()
        loop = asyncio.get_running_loop()
        if self._dispatcher is None:
            self._dispatcher = loop.create_task(self._dispatch(), name="incseg-batcher")
        waiting = _Waiting(image, time.monotonic(), loop.create_future())
        self._queues.setdefault(runtime, deque()).append(waiting)
        self._arrival.set()
        return await waiting.answer

    async def stop(self) -> None:
        """Fails the requests still queued, lets the running batches finish, then ends the threads."""
        self._stopped = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for queue in self._queues.values():
            for waiting in queue:
                if not waiting.answer.done():
                    waiting.answer.set_exception(_stopping())
        self._queues.clear()
        if self._batches:
            await asyncio.wait(self._batches)
        self._executor.shutdown(wait=True)

    def _limit(self, runtime: SegmentationRuntime) -> int:
        return min(self.max_size, runtime.max_batch or self.max_size)

    async def _dispatch(self) -> None:
        """Forever: take a free run, wait for the next batch, start it."""
        while True:
            await self._free_runs.acquire()
            try:
                runtime, batch = await self._next_batch()
            except BaseException:
                self._free_runs.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run(runtime, batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _next_batch(self) -> tuple[SegmentationRuntime, list[_Waiting]]:
        """The oldest request's batch, once its window has closed, it is full or no request is on its way.

        Cancelled requests are dropped.
        """
        while True:
            timeout = None
            if self._queues:
                runtime, queue = min(self._queues.items(), key=lambda item: item[1][0].arrived)
                limit = self._limit(runtime)
                timeout = queue[0].arrived + self.window_s - time.monotonic()
                if len(queue) >= limit or timeout <= 0 or not self._on_the_way:
                    taken = [queue.popleft() for _ in range(min(limit, len(queue)))]
                    if not queue:
                        del self._queues[runtime]
                    batch = [waiting for waiting in taken if not waiting.answer.done()]
                    if batch:
                        return runtime, batch
                    continue
            self._arrival.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), timeout)

    async def _run(self, runtime: SegmentationRuntime, batch: list[_Waiting]) -> None:
        """Runs one batch in a run thread and answers each of its requests."""
        try:
            labels = await asyncio.get_running_loop().run_in_executor(
                self._executor, _run_batch, runtime, batch
            )  # (N, H, W)
        except Exception as error:  # the runtime's error goes to every request of the batch
            _fail(batch, error)
            return
        except BaseException:
            _fail(batch, _stopping())
            raise
        finally:
            self._free_runs.release()
        for waiting, label_map in zip(batch, labels, strict=True):
            if not waiting.answer.done():  # a request whose client left is cancelled
                waiting.answer.set_result(label_map)


def _fail(batch: list[_Waiting], error: BaseException) -> None:
    for waiting in batch:
        if not waiting.answer.done():
            waiting.answer.set_exception(error)


def _stopping() -> NoModelLoaded:
    return NoModelLoaded("the API process is shutting down; retry in a moment", RETRY_SOON_S)
