"""Leftover uploads in the staging folder: an API killed mid-upload, a task recorded without its data."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from service.db import TaskStore
from service.settings import Settings
from service.staging import clean_staging
from service.worker import sweep_orphans
from tests.service.api_support import ApiProcess, wait_until
from tests.service.conftest import make_dataset_archive, stage_dataset

BOUNDARY = "incseg-test-boundary"
DECLARED_BYTES = 64 << 20  # the archive the client announces
SENT_BYTES = 16 << 20  # what it sends before the API process is killed
AN_HOUR_AGO = time.time() - 3600


def disk_bytes(root: Path) -> int:
    """Bytes the files under ``root`` occupy on disk (allocated blocks)."""
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def age(entry: Path, mtime: float) -> None:
    """Sets the modification time of ``entry`` and of everything under it."""
    for path in [entry, *entry.rglob("*")] if entry.is_dir() else [entry]:
        os.utime(path, (mtime, mtime))


def test_clean_staging_deletes_only_stale_unowned_uploads(settings: Settings, tmp_path: Path) -> None:
    """Kept: a queued task's dataset, fresh entries (a live upload in any API process), other files."""
    store = TaskStore(settings.task_database_url)
    try:
        archive = make_dataset_archive(tmp_path, 1)
        owned = stage_dataset(settings, archive)
        store.create("ft", {}, owned.new_classes, owned.path)
        orphan = stage_dataset(settings, archive)  # staged, then the database refused the task
        finished = stage_dataset(settings, archive)  # a failed task whose data deletion did not happen
        failed = store.create("ft", {}, finished.new_classes, finished.path)
        store.fail(failed.id, None, "test")
        part = settings.staging_dir / "incoming-abc.part"
        part.write_bytes(b"\0" * 4096)
        other = settings.staging_dir / "notes.txt"
        other.write_text("not an upload")

        assert clean_staging(settings, store).entries == 0, "every entry was just written"
        for entry in settings.staging_dir.iterdir():
            age(entry, AN_HOUR_AGO - 1)
        leftovers = [orphan.path, finished.path, part]
        leftover_bytes = sum(
            p.lstat().st_size for entry in leftovers for p in [entry, *entry.rglob("*")] if p.is_file()
        )
        removed = clean_staging(settings, store)
        assert (removed.entries, removed.bytes) == (3, leftover_bytes)
        assert sorted(p.name for p in settings.staging_dir.iterdir()) == sorted([owned.path.name, other.name])
    finally:
        store.dispose()


def _start_upload(url: str, sent: int) -> socket.socket:
    """Opens ``POST /tasks`` announcing a DECLARED_BYTES archive and sends its first ``sent`` bytes."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="dataset"; filename="big.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        (
            f"POST /tasks HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(head) + DECLARED_BYTES + len(tail)}\r\n\r\n"
        ).encode()
        + head
    )
    chunk = b"\0" * (1 << 20)
    for _ in range(sent // len(chunk)):
        sock.sendall(chunk)
    return sock


@pytest.mark.timeout(300)
def test_api_killed_mid_upload_leaves_nothing_after_restart_and_sweep(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL of ``incseg api`` half way through a streamed upload: its bytes stay on disk until the next
    API start deletes them (no live upload writes them); the worker's orphan sweep deletes later ones."""
    settings = settings.model_copy(update={"stale_upload_s": 0.0})  # no other API process shares the folder
    staging = settings.staging_dir
    api = ApiProcess(settings, tmp_path / "api-1.log")
    api.wait_healthy()
    sock = _start_upload(api.url, SENT_BYTES)
    try:
        wait_until(lambda: disk_bytes(staging) >= SENT_BYTES - (1 << 20), 60, "the upload to reach the disk")
        api.kill()
    finally:
        sock.close()
    left_after_kill = disk_bytes(staging)
    assert left_after_kill >= SENT_BYTES - (1 << 20)
    assert [p.name.startswith("incoming-") for p in staging.iterdir()] == [True]

    store = TaskStore(settings.task_database_url)
    try:
        archive = make_dataset_archive(tmp_path, 1)
        owned = stage_dataset(settings, archive)  # a queued task's dataset: kept
        store.create("ft", {}, owned.new_classes, owned.path)
        owned_bytes = disk_bytes(owned.path)

        restarted = ApiProcess(settings, tmp_path / "api-2.log")
        try:
            restarted.wait_healthy()
            wait_until(lambda: disk_bytes(staging) == owned_bytes, 60, "the restart to delete the leftover")
        finally:
            restarted.stop()
        print(
            f"API SIGKILLed after {SENT_BYTES} bytes of an upload: {left_after_kill} bytes left in staging; "
            f"after the restart {disk_bytes(staging) - owned_bytes} (besides a queued task's dataset)"
        )

        orphan = stage_dataset(settings, archive)  # the database refused the task after staging
        assert disk_bytes(orphan.path) > 0
        sweep_orphans(settings)
        assert disk_bytes(staging) == owned_bytes and owned.path.is_dir()
    finally:
        store.dispose()
