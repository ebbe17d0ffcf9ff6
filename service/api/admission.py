"""Admission control of ``POST /segment``: a few requests at work, a short queue, then 503.

A request is admitted while fewer than ``concurrency + queue`` are admitted; it then reads its body and
waits on an asyncio semaphore for one of ``concurrency`` work slots (waiting holds no thread) to decode its
image, and again to encode its answer. Decoding and encoding run in worker threads of the admission's own
capacity limiter, so they never take the threads of FastAPI's shared pool that the other routes' handlers
and dependencies use; in between, the request waits for its batch without a slot or a thread
(``service.batcher``, whose own threads run the model). A request that
finds the queue full is answered 503 with ``Retry-After`` before its body is read, and counted in
``incseg_segment_rejected_total``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio.to_thread
from fastapi import HTTPException, status

from service.metrics import SEGMENT_ADMITTED, SEGMENT_REJECTED, SEGMENT_RUNNING

RETRY_AFTER_S = 1  # a segmentation takes tens of milliseconds: a queue of them drains within a second

Result = TypeVar("Result")


class Admission:
    """Bounds the ``/segment`` requests of one API process that are at work and waiting.

    Args:
        concurrency: Requests decoding or encoding at once.
        queue: Admitted requests beyond those (reading their body, waiting for a slot or for the model).
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.capacity = concurrency + queue
        self.admitted = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._threads = anyio.CapacityLimiter(concurrency)

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Holds one of the ``concurrency + queue`` places for the duration of the request.

        Raises:
            HTTPException: 503 with ``Retry-After`` when every place is taken.
        """
        if self.admitted >= self.capacity:
            SEGMENT_REJECTED.inc()
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"the service is busy: {self.concurrency} images are being segmented and "
                f"{self.capacity - self.concurrency} are waiting (INCSEG_SEGMENT_CONCURRENCY, "
                f"INCSEG_SEGMENT_QUEUE); retry after {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.admitted += 1  # no await since the check: no other request ran in between
        try:
            with SEGMENT_ADMITTED.track_inprogress():
                yield
        finally:
            self.admitted -= 1

    async def run(self, function: Callable[..., Result], *args: object) -> Result:
        """Waits for a work slot (on the event loop), then runs ``function(*args)`` in a worker thread."""
        async with self._slots:
            with SEGMENT_RUNNING.track_inprogress():
                return await anyio.to_thread.run_sync(function, *args, limiter=self._threads)
