"""Builders shared by the API tests: registry versions of a tiny model, images, a real uvicorn process."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from export.onnx_export import export_onnx
from service.registry import EXPORT_SUBDIR, MANIFEST_JSON, MODEL_SUBDIR, Registry
from service.settings import Settings
from tests.helpers import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_SIZE = 32  # the conftest settings' serve_size


def publish_version(
    registry: Registry, classes: list[str], *, parity_passed: bool = True, truncate_onnx: bool = False
) -> str:
    """Publishes a tiny randomly initialised model with its real ONNX export; returns the version name.

    Args:
        registry: Where to publish.
        classes: Class names, background first.
        parity_passed: False records a failed parity gate in the export manifest (cannot be activated).
        truncate_onnx: Cuts ``model.onnx`` in half after the export, so loading the version fails.
    """
    with registry.staging() as stage:
        save_tiny_model(stage / MODEL_SUBDIR, classes)
        export_onnx(
            stage / MODEL_SUBDIR, stage / EXPORT_SUBDIR, (SERVE_SIZE, SERVE_SIZE), parity_batches=(1,)
        )
        manifest_path = stage / EXPORT_SUBDIR / MANIFEST_JSON
        if not parity_passed:
            manifest = json.loads(manifest_path.read_text())
            manifest["parity"]["passed"] = False
            manifest_path.write_text(json.dumps(manifest))
        if truncate_onnx:
            onnx_path = stage / EXPORT_SUBDIR / "model.onnx"
            onnx_path.write_bytes(onnx_path.read_bytes()[: onnx_path.stat().st_size // 2])
        info = registry.publish(
            stage, metrics=None, task_id=None, base_version=None, engine="not built: test"
        )
    return info.name


def png_bytes(height: int = 40, width: int = 56, seed: int = 0) -> bytes:
    """A random RGB PNG of the given size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.1):
    """Polls ``condition()`` until it returns a truthy value, which it returns; fails after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def service_process(
    command: list[str], settings: Settings, log_path: Path, url: str | None = None
) -> Iterator[None]:
    """Runs ``command`` with ``settings`` in its environment, waits for ``url``/health if given, stops it."""
    env = {**os.environ, **settings.to_env()}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        if url is not None:

            def healthy() -> bool:
                if process.poll() is not None:
                    raise AssertionError(
                        f"{command} exited with {process.returncode}: {log_path.read_text()}"
                    )
                try:
                    return httpx.get(f"{url}/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, 60, f"{url}/health to answer")
        yield
    finally:
        process.terminate()  # SIGTERM: uvicorn and Celery shut down cleanly
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def uvicorn_api(settings: Settings, log_path: Path) -> Iterator[str]:
    """Runs ``uvicorn service.api.main:create_app --factory`` for ``settings``; yields its base URL."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "uvicorn", "service.api.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--log-level", "warning"]
    with service_process(command, settings, log_path, url):
        yield url
