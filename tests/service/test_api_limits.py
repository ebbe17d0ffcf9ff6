"""Bounds of ``POST /segment`` and ``POST /tasks`` under hostile requests.

Memory per request (peak RSS of a real uvicorn process while it answers a 7900 x 7900 one-bit PNG), bytes
written while a chunked body over the limit streams in, admission control (N running, a short queue,
then 503), and liveness routes that answer while every inference slot is blocked.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY

from export.runtime import SegmentationRuntime
from service.api.main import create_app
from service.model_server import ModelServer
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import ServiceProcess, free_port, publish_version, wait_until

Sent = TypeVar("Sent")  # what a send function returns

pytestmark = pytest.mark.badinput

CLASSES = ["background", "cat", "dog"]
BOMB_SIDE = 7900  # 62.4 M pixels: under the default INCSEG_MAX_IMAGE_PIXELS of 64 M
BOMB_PIXELS = BOMB_SIDE * BOMB_SIDE
MiB = 1 << 20


def one_bit_png(side: int) -> bytes:
    """A black ``side`` x ``side`` one-bit PNG: a few kilobytes on the wire."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def proc_status_bytes(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def written_bytes(pid: int) -> int:
    """Bytes the process has passed to write() so far (``wchar`` of ``/proc/PID/io``: files and sockets)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise KeyError("wchar")


@dataclass
class Api:
    url: str
    pid: int

    def peak_growth(self, send: Callable[[], Sent]) -> tuple[Sent, int]:
        """Runs ``send()`` and returns its response and the process's peak RSS during it minus RSS before."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = proc_status_bytes(self.pid, "VmRSS")
        response = send()
        return response, proc_status_bytes(self.pid, "VmHWM") - before


@contextmanager
def uvicorn_process(settings: Settings, log_path: Path) -> Iterator[Api]:
    """A real ``uvicorn`` process serving the app for ``settings`` (its pid is the server's)."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "service.api.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    api = ServiceProcess(command, settings, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        api.wait_healthy(url, 60)
        yield Api(url, api.process.pid)
    finally:
        api.stop(30)


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Embedded-mode settings with v1 (three classes, 32 px) active."""
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path_factory.mktemp("limits") / "data",
        instance="test-limits",
        serve_size=32,
        ort_threads=1,
        poll_interval_s=0.1,
        max_upload_bytes=MiB,
    )
    registry = Registry(settings.registry_dir)
    registry.activate(publish_version(registry, CLASSES))
    return settings


@pytest.fixture(scope="module")
def api(module_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """uvicorn serving v1, warmed up by one small request of each format."""
    with uvicorn_process(module_settings, tmp_path_factory.mktemp("logs") / "api.log") as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            wait_until(lambda: client.get("/ready").status_code == 200, 60, "v1 to be ready")
            small = one_bit_png(64)
            for output in ("png", "json", "overlay"):
                response = client.post(
                    "/segment",
                    params={"format": output},
                    content=small,
                    headers={"Content-Type": "image/png"},
                )
                assert response.status_code == 200, response.text
        yield server


# bytes per pixel of the input allowed as peak growth, on top of a fixed 64 MiB: the one-bit image decodes
# to 1 byte per pixel; the png mask is 1 byte per pixel at the image's size (plus the palette image's copy)
PEAK_BYTES_PER_PIXEL = {"png": 2.5, "json": 1.5, "overlay": 1.5}


@pytest.mark.parametrize("output", ["png", "json", "overlay"])
def test_a_huge_one_bit_png_grows_the_api_by_a_bounded_amount(api: Api, output: str) -> None:
    data = one_bit_png(BOMB_SIDE)
    with httpx.Client(base_url=api.url, timeout=300) as client:
        response, growth = api.peak_growth(
            lambda: client.post(
                "/segment", params={"format": output}, content=data, headers={"Content-Type": "image/png"}
            )
        )
    assert response.status_code == 200, response.text
    print(f"{output}: peak RSS growth {growth / MiB:.1f} MiB = {growth / BOMB_PIXELS:.2f} B/px")
    assert growth < 64 * MiB + PEAK_BYTES_PER_PIXEL[output] * BOMB_PIXELS
    if output == "png":
        mask = Image.open(io.BytesIO(response.content))
        assert mask.mode == "P" and mask.size == (BOMB_SIDE, BOMB_SIDE)
    elif output == "json":
        body = response.json()
        assert (body["width"], body["height"]) == (BOMB_SIDE, BOMB_SIDE)
        assert sum(body["fractions"].values()) == pytest.approx(1.0)
    else:
        preview = Image.open(io.BytesIO(response.content))
        assert preview.format == "JPEG" and max(preview.size) <= 1024


LARGEST_SIDE = 8000  # 64 M pixels: the default INCSEG_MAX_IMAGE_PIXELS


@pytest.fixture(scope="module")
def largest_rgba_png() -> bytes:
    """The costliest PNG to decode that the defaults accept: 8000 x 8000 RGBA, 4 bytes per pixel in PIL."""
    buffer = io.BytesIO()
    Image.new("RGBA", (LARGEST_SIDE, LARGEST_SIDE), (90, 140, 200, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_concurrent_largest_images_stay_within_the_admission_bound(
    api: Api, module_settings: Settings, largest_rgba_png: bytes
) -> None:
    """Concurrency + queue requests at once: at most ``concurrency`` decode, so the peak is bounded."""
    pixels = LARGEST_SIDE * LARGEST_SIDE
    requests = module_settings.segment_concurrency + module_settings.segment_queue
    headers = {"Content-Type": "image/png"}

    def post_all() -> list[httpx.Response]:
        with httpx.Client(base_url=api.url, timeout=600) as client, ThreadPoolExecutor(requests) as pool:
            futures = [
                pool.submit(
                    client.post,
                    "/segment",
                    params={"format": "json"},
                    content=largest_rgba_png,
                    headers=headers,
                )
                for _ in range(requests)
            ]
            return [future.result() for future in futures]

    responses, growth = api.peak_growth(post_all)
    print(
        f"{requests} x {len(largest_rgba_png)}-byte 8000x8000 RGBA PNG at once: peak RSS growth "
        f"{growth / MiB:.1f} MiB = {growth / pixels:.2f} B/px of one image"
    )
    assert [response.status_code for response in responses] == [200] * requests
    # each of the `concurrency` at work holds its bytes, its decoded image (4 B/px) and reduced copies
    per_request = len(largest_rgba_png) + 4 * pixels + 32 * MiB
    assert growth < module_settings.segment_concurrency * per_request + 64 * MiB


def chunks(head: bytes, size: int, tail: bytes = b"") -> Iterator[bytes]:
    """A generator body (sent chunked, with no Content-Length): ``head``, ``size`` bytes, ``tail``."""
    yield head
    for _ in range(size // MiB):
        yield b"\0" * MiB
    yield tail


def multipart_chunks(field: str, size: int) -> tuple[Iterator[bytes], str]:
    """A chunked multipart body whose file part ``field`` is ``size`` bytes, and its content type."""
    boundary = "limits-test"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="a"\r\n\r\n'
    return chunks(head.encode(), size, f"\r\n--{boundary}--\r\n".encode()), (
        f"multipart/form-data; boundary={boundary}"
    )


SEGMENT_LIMIT = 64 * MiB  # service.api.routes.segment.MAX_IMAGE_BYTES


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/segment", "multipart"),
        ("/segment", "raw"),
        ("/tasks", "multipart"),
        ("/tasks", "raw"),
    ],
)
def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(
    api: Api, module_settings: Settings, path: str, body: str
) -> None:
    size = SEGMENT_LIMIT + 16 * MiB if path == "/segment" else 8 * module_settings.max_upload_bytes
    field = "image" if path == "/segment" else "dataset"
    if body == "multipart":
        content, content_type = multipart_chunks(field, size)
    else:
        content, content_type = chunks(b"", size), "image/png"
    written_before = written_bytes(api.pid)
    with httpx.Client(base_url=api.url, timeout=120) as client:
        response = client.post(path, content=content, headers={"Content-Type": content_type})
    written = written_bytes(api.pid) - written_before
    print(f"{path} {body} chunked, {size / MiB:.0f} MiB: {response.status_code}, API wrote {written} bytes")
    expected = 415 if (path, body) == ("/tasks", "raw") else 413
    assert response.status_code == expected, response.text
    # spool files (TMPDIR), staged parts and the answer all go through write(): only the answer may
    staged_limit = module_settings.max_upload_bytes if path == "/tasks" else 0
    assert written < staged_limit + 64 * 1024
    staging = module_settings.staging_dir
    assert not staging.exists() or list(staging.iterdir()) == []


class BlockingRuntime(SegmentationRuntime):
    """A runtime whose forward pass waits until ``release`` is set, counting the passes waiting."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__("blocking", CLASSES, (32, 32), "v1", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.release = release
        self.waiting = 0
        self._count_lock = threading.Lock()

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        with self._count_lock:
            self.waiting += 1
        self.release.wait()
        with self._count_lock:
            self.waiting -= 1
        return np.zeros((len(batch), len(self.classes), *self.size), np.float32)

    def _release(self) -> None:
        pass


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


IN_FLIGHT = 48  # more than the 40 threads of FastAPI's shared pool


def test_liveness_answers_and_admission_refuses_while_inference_is_blocked(
    module_settings: Settings, tmp_path: Path
) -> None:
    settings = module_settings.model_copy(
        update={
            "segment_concurrency": 2,
            "segment_queue": IN_FLIGHT - 2,
            "batch_max_size": 1,  # one blocked runtime call per request
            "data_dir": tmp_path / "data",
        }
    )
    runs = settings.inference_runs
    source = Registry(module_settings.registry_dir)  # v1 of the module; the app's own registry is empty
    release = threading.Event()
    runtime = BlockingRuntime(release)
    image = one_bit_png(40)
    headers = {"Content-Type": "image/png"}
    app = create_app(settings)
    with TestClient(app) as client, ThreadPoolExecutor(IN_FLIGHT + 3) as pool:
        server = ModelServer(module_settings, source, loader=lambda _: runtime, warmup_iterations=0)
        server.start()
        try:
            assert server.wait_until_serving("v1", 60)
            app.state.model_server = server
            segments = [
                pool.submit(client.post, "/segment", content=image, headers=headers) for _ in range(48)
            ]
            wait_until(
                lambda: (
                    runtime.waiting == runs
                    and gauge("incseg_segment_admitted") == IN_FLIGHT
                    and gauge("incseg_segment_running") == 0
                ),
                60,
                f"{runs} requests blocked in the model and the others decoded, waiting for a run",
            )
            liveness = {path: pool.submit(client.get, path) for path in ("/health", "/ready", "/metrics")}
            done, _ = wait_futures(liveness.values(), timeout=60)
            assert len(done) == 3, f"{[path for path, f in liveness.items() if not f.done()]} did not answer"
            assert {path: future.result().status_code for path, future in liveness.items()} == {
                "/health": 200,
                "/ready": 200,
                "/metrics": 200,
            }
            assert "incseg_segment_admitted 48.0" in liveness["/metrics"].result().text

            rejected_before = gauge("incseg_segment_rejected_total")
            busy = client.post("/segment", content=image, headers=headers)
            assert busy.status_code == 503
            assert busy.headers["Retry-After"] == "1"
            assert "busy" in busy.json()["detail"] and "INCSEG_SEGMENT_QUEUE" in busy.json()["detail"]
            assert gauge("incseg_segment_rejected_total") == rejected_before + 1
            assert runtime.waiting == runs and not any(future.done() for future in segments)
        finally:
            release.set()
            answers = [future.result(timeout=120) for future in segments]
            server.stop()
    assert [answer.status_code for answer in answers] == [200] * IN_FLIGHT
    assert gauge("incseg_segment_admitted") == gauge("incseg_segment_running") == 0
