"""Builders shared by the service tests: registry versions of a tiny model, images, real service processes."""

from __future__ import annotations

import io
import json
import os
import signal
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
from service.worker import worker_argv
from tests.helpers import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
INCSEG_SCRIPT = Path(sys.executable).with_name("incseg")
SERVE_SIZE = 32  # the conftest settings' serve_size


def publish_version(
    registry: Registry,
    classes: list[str],
    *,
    parity_passed: bool = True,
    truncate_onnx: bool = False,
    history: list[dict] | None = None,
) -> str:
    """Publishes a tiny randomly initialised model with its real ONNX export; returns the version name.

    Args:
        registry: Where to publish.
        classes: Class names, background first.
        parity_passed: False records a failed parity gate in the export manifest (cannot be activated).
        truncate_onnx: Cuts ``model.onnx`` in half after the export, so loading the version fails.
        history: The model's step records (e.g. ``[{"method": "star"}]``); none by default.
    """
    with registry.staging() as stage:
        save_tiny_model(stage / MODEL_SUBDIR, classes, history=history)
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


class ServiceProcess:
    """A service command in its own session, with ``settings`` in its environment and its output in a log.

    Its own session lets :meth:`kill` take down the command and every process it started at once (a
    machine or container dying); :meth:`stop` is the orderly SIGTERM (uvicorn and Celery shut down
    cleanly), then SIGKILL after ``grace_s``.
    """

    def __init__(
        self, command: list[str], settings: Settings, log_path: Path, cwd: Path | None = REPO_ROOT
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = command
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                env={**os.environ, **settings.to_env()},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def _check_alive(self) -> None:
        assert self.alive(), (
            f"{self.command[:3]} exited with {self.process.returncode}:\n{self.log()[-4000:]}"
        )

    def wait_log(self, marker: str, timeout_s: float) -> None:
        """Waits until the log holds ``marker``; fails at once if the process exits."""

        def logged() -> bool:
            self._check_alive()
            return marker in self.log()

        wait_until(logged, timeout_s, f"{marker!r} in {self.log_path}", poll_s=0.2)

    def wait_healthy(self, url: str, timeout_s: float = 90) -> None:
        """Waits until ``url``/health answers 200; fails at once if the process exits."""

        def healthy() -> bool:
            self._check_alive()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout_s, f"{url}/health", poll_s=0.2)

    def freeze(self) -> None:
        """SIGSTOP to the whole session: it keeps what it holds and does nothing until :meth:`thaw`."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT to the whole session after :meth:`freeze`."""
        os.killpg(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL to the whole session: no shutdown handler runs."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, grace_s: float = 60) -> None:
        """SIGTERM to the whole session, then SIGKILL if it has not ended after ``grace_s``."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()


class ApiProcess(ServiceProcess):
    """``incseg api`` on a free port."""

    def __init__(self, settings: Settings, log_path: Path, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(INCSEG_SCRIPT), "api", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(command, settings, log_path, cwd)

    def wait_healthy(self, url: str | None = None, timeout_s: float = 90) -> None:
        super().wait_healthy(url or self.url, timeout_s)


class WorkerProcess(ServiceProcess):
    """A real ``celery -A service.celery_app worker`` with the settings' queue and concurrency.

    Killing only its pool process (not :meth:`kill`) exercises the requeue path.
    """

    def __init__(self, settings: Settings, log_path: Path) -> None:
        super().__init__(
            [sys.executable, "-m", "celery", "-A", "service.celery_app", *worker_argv(settings)],
            settings,
            log_path,
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        self.wait_log(" ready.", timeout_s)


@contextmanager
def uvicorn_api(settings: Settings, log_path: Path) -> Iterator[str]:
    """Runs ``uvicorn service.api.main:create_app --factory`` for ``settings``; yields its base URL."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "uvicorn", "service.api.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--log-level", "warning"]
    api = ServiceProcess(command, settings, log_path)
    try:
        api.wait_healthy(url, 60)
        yield url
    finally:
        api.stop(30)
