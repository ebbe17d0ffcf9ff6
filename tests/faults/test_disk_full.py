"""Disk full while the worker writes a new version into the registry (a size-limited tmpfs)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.registry import STAGE_PREFIX
from tests.faults.conftest import FINISHED, FaultStack, post_task, segment, wait_task
from tests.service.api_support import png_bytes, wait_until
from tests.service.conftest import image_files, make_dataset_archive, publish_tiny_version

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

MIB = 1 << 20


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[None]:
    """Mounts a tmpfs of ``size_bytes`` on ``path`` (needs root with CAP_SYS_ADMIN); unmounts it after."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        _mount("-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        pytest.skip(f"mounting a size-limited tmpfs needs root with CAP_SYS_ADMIN: {detail}")
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False, capture_output=True)


def shrink_to_free(path: Path, free_bytes: int) -> None:
    """Remounts the tmpfs on ``path`` so that ``free_bytes`` are left beyond what it holds now."""
    stats = os.statvfs(path)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    _mount("-o", f"remount,size={used + free_bytes}", str(path))


# where the write runs out of space: at once (the trained weights), or after the weights (the ONNX export)
FREE_SPACE = [pytest.param(1 * MIB, id="1 MiB free"), pytest.param(30 * MIB, id="30 MiB free")]


@pytest.mark.parametrize("free_bytes", FREE_SPACE)
def test_disk_full_during_the_registry_write(stack: FaultStack, tmp_path: Path, free_bytes: int) -> None:
    registry_dir = stack.settings.registry_dir
    with tmpfs(registry_dir, 512 * MIB):
        registry = stack.registry
        registry.activate(publish_tiny_version(registry, ["background", "a", "b"]).name)
        shrink_to_free(registry_dir, free_bytes)
        before = sorted(path.name for path in registry_dir.iterdir())
        api = stack.start_api()
        stack.start_worker()
        image = png_bytes(32, 32)
        with httpx.Client(base_url=api.url, timeout=30) as client:
            wait_until(lambda: segment(client, image) == (200, "v1"), 60, "v1 to serve")
            task_id = post_task(client, make_dataset_archive(tmp_path, 3, seed=2), method="mib", epochs=1)
            phases: list[str] = []

            def finished(task: dict) -> bool:
                if not phases or phases[-1] != task["phase"]:
                    phases.append(task["phase"])
                return task["state"] in FINISHED

            task = wait_task(client, task_id, finished, 240, "to finish")
            print(f"\nphases {phases}: {task['error']}")
            assert task["state"] == "failed", task
            assert "disk" in task["error"] and "full" in task["error"], task["error"]
            assert segment(client, image) == (200, "v1")
            models = client.get("/models").json()
            assert models["active"] == models["serving"] == "v1" and len(models["versions"]) == 1
        after = sorted(path.name for path in registry_dir.iterdir())
        assert after == before and not any(name.startswith(STAGE_PREFIX) for name in after), after
        assert registry.active() == "v1"
        assert image_files(stack.settings.data_dir / "staging") == []
        stack.stop()  # before the unmount
