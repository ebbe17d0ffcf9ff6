"""The ``/segment`` batcher: windows, batch limits, one runtime per batch, errors and shutdown.

Unit tests drive :class:`service.batcher.Batcher` on an event loop of their own with runtimes whose label
map is a constant that each image carries in its pixels, so a request answered with another request's
labels is seen. The API test compares each batched answer with the same image's unbatched answer, with a
runtime whose labels depend on every pixel; the exported model itself gives a batch the logits it gives
each image alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from export.runtime import OrtRuntime, SegmentationRuntime
from service.api.main import create_app
from service.batcher import Batcher
from service.model_server import ModelServer, NoModelLoaded
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import png_bytes

CLASSES = ["background", "a", "b", "c", "d", "e", "f", "g"]
CANVAS = (4, 6)


class LabelRuntime(SegmentationRuntime):
    """A runtime whose label map for an image is the image's first pixel, recording each call.

    Args:
        max_batch: The runtime's own largest batch (None: any).
        fail: Raised by every call, when given.
        release: When given, each call waits until it is set.
    """

    def __init__(
        self,
        max_batch: int | None = None,
        fail: Exception | None = None,
        release: threading.Event | None = None,
    ) -> None:
        super().__init__(
            "labels", CLASSES, CANVAS, "v1", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), max_batch=max_batch
        )
        self.fail = fail
        self.release = release
        self.calls: list[tuple[float, list[int]]] = []  # (monotonic time, each image's label)
        self.in_flight = 0
        self._lock = threading.Lock()

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls.append((time.monotonic(), [int(image[0, 0, 0]) for image in batch]))
            self.in_flight += 1
        try:
            if self.release is not None:
                self.release.wait(30)
            if self.fail is not None:
                raise self.fail
            logits = np.zeros((len(batch), len(CLASSES), *CANVAS), np.float32)  # (N, C, H, W)
            for index, image in enumerate(batch):
                logits[index, int(image[0, 0, 0])] = 1.0
            return logits
        finally:
            with self._lock:
                self.in_flight -= 1

    def _release(self) -> None:
        pass


def image_of(label: int) -> np.ndarray:
    """A normalised image float32 (3, H, W) whose label map is ``label`` everywhere."""
    return np.full((3, *CANVAS), float(label), np.float32)


async def segment_all(batcher: Batcher, runtime: SegmentationRuntime, labels: list[int]) -> list[np.ndarray]:
    """Submits one image per label at once; their label maps in the same order."""
    return await asyncio.gather(*(batcher.labels(runtime, image_of(label)) for label in labels))


def test_requests_within_the_window_share_one_call_and_each_gets_its_own_labels() -> None:
    runtime = LabelRuntime()

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(window_s=0.5, max_size=8, runs=2)
        try:
            return await segment_all(batcher, runtime, [1, 2, 3, 4, 5])
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert [batch for _, batch in runtime.calls] == [[1, 2, 3, 4, 5]]
    assert [int(np.unique(answer).item()) for answer in answers] == [1, 2, 3, 4, 5]
    assert all(answer.shape == CANVAS and answer.dtype == np.uint8 for answer in answers)


def test_a_request_waits_the_window_for_one_on_its_way_and_no_longer() -> None:
    window_s = 0.3
    runtime = LabelRuntime()

    async def scenario() -> float:
        batcher = Batcher(window_s=window_s, max_size=8, runs=1)
        try:
            with (
                batcher.on_the_way()
            ):  # another request is decoding its image, and takes longer than the window
                submitted = time.monotonic()
                await batcher.labels(runtime, image_of(3))
            return submitted
        finally:
            await batcher.stop()

    submitted = asyncio.run(scenario())
    ((called, batch),) = runtime.calls
    assert batch == [3]
    assert window_s - 0.01 <= called - submitted <= window_s + 0.2  # the margin is for a loaded machine


def test_a_lone_request_runs_at_once() -> None:
    """No request on its way: none can join, so the window does not hold the lone one."""
    runtime = LabelRuntime()

    async def scenario() -> float:
        batcher = Batcher(window_s=30.0, max_size=8, runs=1)
        try:
            submitted = time.monotonic()
            await batcher.labels(runtime, image_of(3))
            return time.monotonic() - submitted
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) < 5.0
    assert [batch for _, batch in runtime.calls] == [[3]]


def test_a_request_on_its_way_within_the_window_joins_the_batch() -> None:
    runtime = LabelRuntime()

    async def scenario() -> tuple[list[np.ndarray], float]:
        batcher = Batcher(window_s=30.0, max_size=8, runs=1)
        try:
            started = time.monotonic()
            with batcher.on_the_way():
                first = asyncio.ensure_future(batcher.labels(runtime, image_of(1)))
                await asyncio.sleep(0.05)  # the second request decodes its image while the first waits
                assert not runtime.calls, "the first request ran without the one on its way"
            second = batcher.labels(
                runtime, image_of(2)
            )  # queued as its on-the-way mark ends, no await between
            answers = await asyncio.gather(first, second)
            return list(answers), time.monotonic() - started
        finally:
            await batcher.stop()

    answers, seconds = asyncio.run(scenario())
    assert seconds < 5.0  # the window (30 s) closed once nothing else was on its way
    assert [batch for _, batch in runtime.calls] == [[1, 2]]
    assert [int(np.unique(answer).item()) for answer in answers] == [1, 2]


def test_a_full_batch_runs_without_waiting_for_the_window() -> None:
    runtime = LabelRuntime()

    async def scenario() -> float:
        batcher = Batcher(window_s=30.0, max_size=4, runs=1)
        try:
            started = time.monotonic()
            await segment_all(batcher, runtime, [1, 2, 3, 4])
            return time.monotonic() - started
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) < 5.0
    assert [batch for _, batch in runtime.calls] == [[1, 2, 3, 4]]


def test_the_runtime_max_batch_and_max_size_cap_each_call() -> None:
    capped = LabelRuntime(max_batch=2)
    uncapped = LabelRuntime()

    async def scenario() -> None:
        batcher = Batcher(window_s=0.05, max_size=3, runs=1)
        try:
            await segment_all(batcher, capped, [1, 2, 3, 4, 5])
            await segment_all(batcher, uncapped, [1, 2, 3, 4, 5])
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert [batch for _, batch in capped.calls] == [[1, 2], [3, 4], [5]]
    assert [batch for _, batch in uncapped.calls] == [[1, 2, 3], [4, 5]]


def test_requests_on_different_runtimes_never_share_a_call() -> None:
    old, new = LabelRuntime(), LabelRuntime()

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(window_s=0.2, max_size=8, runs=2)
        try:
            return await asyncio.gather(
                *(batcher.labels(old if label % 2 else new, image_of(label)) for label in range(1, 7))
            )
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert [batch for _, batch in old.calls] == [[1, 3, 5]]
    assert [batch for _, batch in new.calls] == [[2, 4, 6]]
    assert [int(np.unique(answer).item()) for answer in answers] == [1, 2, 3, 4, 5, 6]


def test_a_runtime_error_fails_every_request_of_its_batch_and_the_next_batch_runs() -> None:
    broken, working = LabelRuntime(fail=ValueError("bad input tensor")), LabelRuntime()

    async def scenario() -> tuple[list[np.ndarray | BaseException], list[np.ndarray]]:
        batcher = Batcher(window_s=0.05, max_size=8, runs=1)
        try:
            failures = await asyncio.gather(
                *(batcher.labels(broken, image_of(label)) for label in (1, 2, 3)), return_exceptions=True
            )
            return failures, await segment_all(batcher, working, [4])
        finally:
            await batcher.stop()

    failures, (after,) = asyncio.run(scenario())
    assert [batch for _, batch in broken.calls] == [[1, 2, 3]]
    assert [type(failure) for failure in failures] == [ValueError] * 3
    assert all(str(failure) == "bad input tensor" for failure in failures)
    assert int(np.unique(after).item()) == 4


def test_runs_bound_the_calls_at_once_and_the_loop_stays_free() -> None:
    release = threading.Event()
    runtime = LabelRuntime(release=release)

    async def scenario() -> tuple[int, list[np.ndarray]]:
        batcher = Batcher(window_s=0.0, max_size=1, runs=2)
        try:
            answers = asyncio.gather(*(batcher.labels(runtime, image_of(label)) for label in (1, 2, 3)))
            while runtime.in_flight < 2:
                await asyncio.sleep(0.01)  # the loop runs while both runs are blocked in the runtime
            await asyncio.sleep(0.2)
            in_flight = runtime.in_flight
            release.set()
            return in_flight, await answers
        finally:
            release.set()
            await batcher.stop()

    in_flight, answers = asyncio.run(scenario())
    assert in_flight == 2
    assert [int(np.unique(answer).item()) for answer in answers] == [1, 2, 3]


def test_stop_fails_the_queued_requests_and_lets_the_running_batch_finish() -> None:
    release = threading.Event()
    runtime = LabelRuntime(release=release)

    async def scenario() -> tuple[list[object], list[int]]:
        batcher = Batcher(window_s=0.0, max_size=1, runs=1)
        running = asyncio.ensure_future(batcher.labels(runtime, image_of(1)))
        while runtime.in_flight < 1:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(batcher.labels(runtime, image_of(2)))
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waits for the running batch
        release.set()
        await asyncio.wait_for(stopping, 30)
        late = await asyncio.gather(batcher.labels(runtime, image_of(3)), return_exceptions=True)
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        return [*outcomes, *late], [label for _, batch in runtime.calls for label in batch]

    (ran, queued, late), called = asyncio.run(scenario())
    assert isinstance(ran, np.ndarray) and int(np.unique(ran).item()) == 1
    assert isinstance(queued, NoModelLoaded) and queued.retry_after_s is not None
    assert isinstance(late, NoModelLoaded)
    assert called == [1]


def batch_histogram() -> tuple[float, float, float]:
    """(images, runtime calls, images timed waiting for their batch) of the batch histograms so far."""
    images = REGISTRY.get_sample_value("incseg_segment_batch_size_sum") or 0.0
    calls = REGISTRY.get_sample_value("incseg_segment_batch_size_count") or 0.0
    waits = REGISTRY.get_sample_value("incseg_segment_batch_wait_seconds_count") or 0.0
    return images, calls, waits


class PixelRuntime(SegmentationRuntime):
    """Labels each pixel with its strongest channel: an answer that depends on every pixel of its image.

    Args:
        hold_first: When given, the first call waits (at most 60 s) until it returns True.
    """

    def __init__(self, hold_first: Callable[[], bool] | None = None) -> None:
        super().__init__(
            "pixel", ["red", "green", "blue"], (32, 32), "v1", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        )
        self.hold_first = hold_first
        self.calls = 0

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.hold_first is not None and self.calls == 1:
            deadline = time.monotonic() + 60
            while not self.hold_first() and time.monotonic() < deadline:
                time.sleep(0.01)
        return batch.copy()  # (N, 3, H, W): one class per channel

    def _release(self) -> None:
        pass


@pytest.mark.parametrize("output", ["png", "json"])
def test_batched_answers_equal_unbatched_ones_under_concurrent_clients(
    settings: Settings, active_registry: Registry, output: str
) -> None:
    sizes = [(32, 32), (40, 56), (17, 90), (64, 48), (25, 25), (90, 33), (32, 32), (48, 20)]
    images = [png_bytes(height, width, seed) for seed, (height, width) in enumerate(sizes)]
    headers = {"Content-Type": "image/png"}

    def answers(max_size: int, window_ms: float) -> list[tuple[int, bytes, str | None]]:
        served = settings.model_copy(
            update={"batch_max_size": max_size, "batch_window_ms": window_ms, "segment_queue": 16}
        )
        app = create_app(served)
        # the first call waits until every request is admitted, so the others queue or decode meanwhile; with
        # one model run at once, the next batch takes them together
        runtime = PixelRuntime(hold_first=lambda: app.state.segment_admission.admitted == len(images))
        server = ModelServer(served, active_registry, loader=lambda _: runtime, warmup_iterations=0)
        batcher = Batcher(window_ms / 1000, max_size, runs=1)
        with TestClient(app) as client, ThreadPoolExecutor(len(images)) as pool:
            server.start()
            try:
                assert server.wait_until_serving(timeout=60)
                app.state.model_server = server
                app.state.segment_batcher = batcher
                posted = [
                    pool.submit(client.post, f"/segment?format={output}", content=image, headers=headers)
                    for image in images
                ]
                responses = [future.result(timeout=120) for future in posted]
            finally:
                assert client.portal is not None
                client.portal.call(batcher.stop)
                server.stop()
        return [(r.status_code, r.content, r.headers.get("X-Model-Version")) for r in responses]

    unbatched = answers(max_size=1, window_ms=0)
    before = batch_histogram()
    batched = answers(max_size=8, window_ms=500)
    after = batch_histogram()
    assert batched == unbatched
    assert {status for status, _, _ in batched} == {200}
    assert unbatched[0][1] != unbatched[6][1]  # two images of one size: distinct answers, a mix-up would show
    images_run, calls = after[0] - before[0], after[1] - before[1]
    assert images_run == len(images) and calls < len(images)  # the requests did share runtime calls


def test_the_onnx_runtime_labels_a_batch_as_it_labels_each_image(active_registry: Registry) -> None:
    """The exported model itself: a batch of N gives each image the logits and labels it gets alone."""
    version = active_registry.active()
    assert version is not None
    runtime = OrtRuntime(active_registry.export_dir(version), threads=1)
    batch = np.random.default_rng(0).standard_normal((5, 3, *runtime.size), dtype=np.float32)
    try:
        alone = np.concatenate([runtime.predict_logits(batch[i : i + 1]) for i in range(len(batch))])
        together = runtime.predict_logits(batch)  # (N, C, H, W)
        labels_alone = np.concatenate([runtime.predict_labels(batch[i : i + 1]) for i in range(len(batch))])
        labels_together = runtime.predict_labels(batch)
    finally:
        runtime.close()
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(labels_together, labels_alone)
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # the logits do depend on the image


def test_each_runtime_call_and_image_wait_is_observed_in_the_batch_histograms(
    settings: Settings, active_registry: Registry
) -> None:
    app = create_app(settings)
    with TestClient(app) as client:
        assert app.state.model_server.wait_until_serving(timeout=60)
        before = batch_histogram()
        assert client.post("/segment", content=png_bytes(), headers={"Content-Type": "image/png"}).is_success
        after = batch_histogram()
        text = client.get("/metrics").text
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (1.0, 1.0, 1.0)
    assert "# TYPE incseg_segment_batch_size histogram" in text
    assert "# TYPE incseg_segment_batch_wait_seconds histogram" in text
