"""``done`` means servable: ``POST /segment`` while the first version loads, or after its load failed.

The app runs under FastAPI's TestClient with the model server's loader replaced by one that blocks or
fails on cue (the real ONNX Runtime CPU loader behind it); the end-to-end test runs the real thing: an
API process, a worker process with the embedded broker, a task through HTTP, then ``/segment`` at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

import service.api.main
from export.runtime import SegmentationRuntime
from service.api.main import create_app
from service.model_server import ModelServer
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import png_bytes, publish_version, uvicorn_api, wait_until
from tests.service.conftest import make_dataset_archive
from tests.service.loaders import BlockingLoader, FlakyLoader

CLASSES = ["background", "cat", "dog"]
IMAGE = png_bytes(24, 40)


@pytest.fixture
def serve_with(monkeypatch: pytest.MonkeyPatch) -> Callable[..., AbstractContextManager[TestClient]]:
    """Runs the app for ``settings`` with ``loader`` as its model server's loader."""

    @contextmanager
    def serve(settings: Settings, loader: Callable[[Path], SegmentationRuntime]) -> Iterator[TestClient]:
        monkeypatch.setattr(service.api.main, "ModelServer", partial(ModelServer, loader=loader))
        with TestClient(create_app(settings)) as client:
            yield client

    return serve


def post_image(client: TestClient | httpx.Client) -> httpx.Response:
    return client.post("/segment", content=IMAGE, headers={"Content-Type": "image/png"})


def metric(client: TestClient, name: str) -> float:
    """A metric's value in the app's ``/metrics`` (0 when absent)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def test_segment_during_the_first_load_is_held_until_the_version_serves(
    settings: Settings, registry: Registry, serve_with
) -> None:
    version = publish_version(registry, CLASSES)
    loader = BlockingLoader(settings, version)
    slow_poll = settings.model_copy(update={"poll_interval_s": 60.0})  # only the request notices the pointer
    with serve_with(slow_poll, loader) as client:
        registry.activate(version)  # what the worker does right before it marks the task done
        answers: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: answers.append(post_image(client)))
        started = time.monotonic()
        thread.start()
        assert loader.entered.wait(30), "the request did not start the load"
        assert client.get("/models").json()["loading"] == version
        ready = client.get("/ready")
        assert ready.status_code == 503 and f"loading and warming up {version}" in ready.json()["detail"]
        assert thread.is_alive()  # held: the version it needs is still loading
        loader.release.set()
        thread.join(60)
        held_s = time.monotonic() - started
    (answer,) = answers
    print(f"\nheld {held_s:.3f} s, answered {answer.status_code} by {answer.headers.get('X-Model-Version')}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Model-Version"] == version


def test_segment_gets_503_with_retry_after_when_the_load_outlasts_the_wait(
    settings: Settings, registry: Registry, serve_with
) -> None:
    version = publish_version(registry, CLASSES)
    registry.activate(version)
    loader = BlockingLoader(settings, version)
    short_wait = settings.model_copy(update={"model_wait_s": 0.3})
    with serve_with(short_wait, loader) as client:
        assert loader.entered.wait(30), "the load never started"
        started = time.monotonic()
        refused = post_image(client)
        held_s = time.monotonic() - started
        retry_after = refused.headers.get("Retry-After")
        print(f"\nheld {held_s:.3f} s, then {refused.status_code} with Retry-After {retry_after}")
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert f"model version {version} is loading and warming up" in refused.json()["detail"]
        assert held_s >= short_wait.model_wait_s  # it waited the bound before refusing
        loader.release.set()
        wait_until(lambda: client.get("/ready").status_code == 200, 30, f"{version} to serve")
        answer = post_image(client)
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == version


def test_a_failed_first_version_is_503_with_the_next_attempt_and_reported(
    settings: Settings, registry: Registry, serve_with
) -> None:
    version = publish_version(registry, CLASSES)
    registry.activate(version)
    loader = FlakyLoader(settings, version, failures=1)
    late_retry = settings.model_copy(update={"model_retry_s": 600.0, "model_retry_max_s": 600.0})
    failures_before = REGISTRY.get_sample_value("incseg_model_swap_failures_total") or 0.0
    with serve_with(late_retry, loader) as client:
        wait_until(lambda: client.get("/models").json()["retry"], 30, "the failed load")
        listed_at = time.monotonic()
        retry = client.get("/models").json()["retry"]  # the attempt is 600 s away: still pending
        assert retry["version"] == version and retry["attempts"] == 1
        assert retry["error"] == "OSError: injected transient read error 1"
        assert 0 < retry["next_attempt_in_s"] <= 600 and retry["next_attempt_at"] > time.time()
        started = time.monotonic()
        refused = post_image(client)
        assert time.monotonic() - started < late_retry.model_wait_s  # not held: the retry is too far off
        since_listed_s = time.monotonic() - listed_at
        assert refused.status_code == 503, refused.text
        retry_after = int(refused.headers["Retry-After"])  # the seconds left until the attempt, rounded up
        assert (
            retry["next_attempt_in_s"] - since_listed_s
            <= retry_after
            <= math.ceil(retry["next_attempt_in_s"])
        )
        detail = refused.json()["detail"]
        assert f"model version {version} failed to load (OSError: injected transient read error 1)" in detail
        assert "attempt 2 starts in" in detail and "activate another version" in detail
        ready = client.get("/ready").json()["detail"]
        assert f"{version} failed to load (GET /models has the error)" in ready and "attempt 2 in" in ready
        assert "injected" not in ready  # a load error names files: only key holders read it
        listing = client.get("/models").json()
        assert listing["serving"] is None and listing["load_retries"] == 0
        assert "injected transient read error 1" in listing["versions"][0]["load_failure"]
        assert metric(client, "incseg_model_swap_failures_total") == failures_before + 1


def test_a_client_following_retry_after_is_served_once_a_retry_succeeds(
    settings: Settings, registry: Registry, serve_with
) -> None:
    version = publish_version(registry, CLASSES)
    registry.activate(version)
    loader = FlakyLoader(settings, version, failures=2)
    soon = settings.model_copy(update={"model_retry_s": 0.5, "model_retry_max_s": 1.0})
    retries_before = REGISTRY.get_sample_value("incseg_model_load_retries_total") or 0.0
    with serve_with(soon, loader) as client:
        wait_until(lambda: client.get("/models").json()["retry"], 30, "the first failed load")
        started = time.monotonic()
        refusals = []
        while (answer := post_image(client)).status_code == 503:
            assert "failed to load (OSError: injected transient read error" in answer.json()["detail"]
            refusals.append(int(answer.headers["Retry-After"]))
            assert refusals[-1] >= 1 and len(refusals) < 10
            time.sleep(refusals[-1])  # what a client does with Retry-After
        served_s = time.monotonic() - started
        print(f"\nserved after {served_s:.3f} s, {len(refusals)} 503s with Retry-After {refusals}")
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == version
        assert len(loader.attempts) == 3
        listing = client.get("/models").json()
        assert listing["retry"] is None and listing["load_retries"] == 2 and listing["swap_failures"] == 2
        assert listing["versions"][0]["load_failure"] is None
        assert metric(client, "incseg_model_load_retries_total") == retries_before + 2


def test_no_version_at_all_is_still_409_at_once(settings: Settings, serve_with) -> None:
    with serve_with(settings, FlakyLoader(settings, "v1", failures=0)) as client:
        started = time.monotonic()
        answer = post_image(client)
        assert time.monotonic() - started < settings.model_wait_s
        assert answer.status_code == 409 and "no model version exists yet" in answer.json()["detail"]
        assert "Retry-After" not in answer.headers


@pytest.mark.timeout(600)
def test_segment_right_after_a_task_reads_done_answers(
    settings: Settings, start_worker, tmp_path: Path
) -> None:
    # embedded mode (filesystem broker, pointer polling); a slow poll widens the window between `done` and
    # the API noticing the new version, as a slow load (a TensorRT engine) or a lost announcement does
    settings = settings.model_copy(update={"poll_interval_s": 5.0})
    start_worker(settings)
    archive = make_dataset_archive(tmp_path, 2, seed=3)
    with uvicorn_api(settings, tmp_path / "api.log") as url, httpx.Client(base_url=url, timeout=60) as client:
        assert post_image(client).status_code == 409  # no version yet
        with archive.open("rb") as file:
            created = client.post("/tasks", files={"dataset": (archive.name, file, "application/zip")})
        assert created.status_code == 202, created.text
        location = created.headers["Location"]

        def finished() -> dict | None:
            task = client.get(location).json()
            return task if task["state"] in ("done", "failed", "cancelled") else None

        task = wait_until(finished, 300, "the task to finish", poll_s=0.02)
        assert task["state"] == "done", task
        started = time.monotonic()
        answer = post_image(client)  # at once: the API may not even have noticed v1 yet
        answered_s = time.monotonic() - started
        print(f"\n/segment right after done: {answer.status_code} in {answered_s:.3f} s")
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Model-Version"] == task["model_version"] == "v1"
