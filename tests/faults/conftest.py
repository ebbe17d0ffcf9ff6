"""Fixtures of the fault suite: real processes that the tests kill, restart and starve.

Every test gets its own ``redis-server`` on a free port (never the shared one at 6379: restarting that
would break every other test and session using it), the API as a separate ``incseg api`` process on a
free port, and Celery workers as separate processes (:class:`tests.service.api_support.WorkerProcess`).
The task table is SQLite in the test's data directory; the settings are the tiny ones of the service
tests (resnet10 with 16 channels, 32 px, exported at 32 x 32).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import ApiProcess, WorkerProcess, free_port, png_bytes, wait_until
from tests.service.conftest import TINY_STEP_OPTIONS

FINISHED = ("done", "failed", "cancelled")


class RedisServer:
    """A ``redis-server`` of this test on its own port, without persistence.

    :meth:`restart` does what an operator (or a crash) does: ``redis-cli -p P shutdown nosave``, then the
    same start command; everything the server held (queued messages, unacknowledged ones) is gone.
    """

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(workdir),
        ]
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "wb")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: self.cli("ping").stdout.strip() == "PONG", 20, f"redis-server on {self.port}")

    def shutdown(self) -> None:
        """``redis-cli shutdown nosave`` and wait for the process to end."""
        assert self.process is not None
        self.cli("shutdown", "nosave")
        self.process.wait(timeout=20)

    def restart(self) -> None:
        self.shutdown()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


@dataclass
class FaultStack:
    """One test's service: settings on its own Redis, and starters for API and worker processes."""

    settings: Settings
    redis: RedisServer
    tmp_path: Path
    apis: list[ApiProcess] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def registry(self) -> Registry:
        return Registry(self.settings.registry_dir)

    def start_api(self) -> ApiProcess:
        api = ApiProcess(self.settings, self.tmp_path / f"api-{len(self.apis)}.log")
        self.apis.append(api)
        api.wait_healthy()
        return api

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.settings, self.tmp_path / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def stop(self) -> None:
        for api in self.apis:
            api.stop()
        for worker in self.workers:
            worker.stop()


def fault_settings(data_dir: Path, redis_url: str) -> Settings:
    """Tiny models and short intervals; the orphan timeout is long, as a dead worker on this host is
    noticed by its process id at once and a busy 2-core machine may delay a heartbeat by seconds."""
    return Settings(
        _env_file=None,
        data_dir=data_dir,
        redis_url=redis_url,
        instance=f"fault-{uuid.uuid4().hex[:12]}",
        serve_size=32,
        ort_threads=1,
        poll_interval_s=0.2,
        default_epochs=1,
        default_size=32,
        default_batch_size=2,
        step_options=TINY_STEP_OPTIONS,
        progress_interval_s=0.2,
        heartbeat_interval_s=0.5,
        orphan_timeout_s=120.0,
        line_wait_s=1.0,
        resend_after_s=3.0,
    )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[FaultStack]:
    """Own Redis, settings under ``tmp_path/data``; API and worker processes started by the test."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("the fault suite starts its own redis-server and needs redis-server and redis-cli")
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    faults = FaultStack(fault_settings(tmp_path / "data", redis_server.url), redis_server, tmp_path)
    try:
        yield faults
    finally:
        faults.stop()
        redis_server.stop()


def post_task(client: httpx.Client, archive: Path, **fields: str | int) -> str:
    """``POST /tasks`` with a dataset archive; returns the task id (asserts 202)."""
    with archive.open("rb") as file:
        response = client.post(
            "/tasks",
            files={"dataset": (archive.name, file)},
            data={name: str(value) for name, value in fields.items()},
        )
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def wait_task(
    client: httpx.Client, task_id: str, condition: Callable[[dict], bool], timeout_s: float, what: str
) -> dict:
    """Polls ``GET /tasks/{id}`` until ``condition(task)`` holds; returns the task."""

    def check() -> dict | None:
        task = client.get(f"/tasks/{task_id}").json()
        return task if condition(task) else None

    return wait_until(check, timeout_s, f"task {task_id}: {what}", poll_s=0.1)


def segment(client: httpx.Client, image: bytes) -> tuple[int, str | None]:
    """``POST /segment?format=json``; returns the status and the X-Model-Version header."""
    response = client.post(
        "/segment", params={"format": "json"}, content=image, headers={"Content-Type": "image/png"}
    )
    return response.status_code, response.headers.get("X-Model-Version")


class SegmentTraffic:
    """A thread posting ``/segment`` back to back, recording every answer (status and version) or error.

    Args:
        url: The API's base URL.
        pause_s: Sleep between two requests.
    """

    def __init__(self, url: str, pause_s: float = 0.02) -> None:
        self.url = url
        self.pause_s = pause_s
        self.answers: list[tuple[float, str, str | None]] = []  # (time, status or error name, version)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segment-traffic", daemon=True)

    def _run(self) -> None:
        image = png_bytes(32, 32)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    status, version = segment(client, image)
                    self.answers.append((time.monotonic(), str(status), version))
                except httpx.HTTPError as error:
                    self.answers.append((time.monotonic(), type(error).__name__, None))
                self._stop.wait(self.pause_s)

    def __enter__(self) -> SegmentTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def outcomes(self) -> Counter:
        """Answers by status (or error name)."""
        return Counter(outcome for _, outcome, _ in self.answers)

    def versions(self) -> list[str | None]:
        """The X-Model-Version of every 200 answer, in order."""
        return [version for _, outcome, version in self.answers if outcome == "200"]
