"""Leftover uploads in the staging folder: found and deleted on API start and in the worker's orphan sweep.

``POST /tasks`` streams the request body into ``incoming-*.part`` and extracts it into an ``upload-*``
folder, which the task owns once it is recorded; the task's end deletes it. An API process killed
mid-upload, or a database error between staging and recording the task, leaves both behind, and nothing
else would ever delete them (up to the 20 GiB uncompressed limit each).

An entry is a leftover when no unfinished task owns it and nothing was written to it for
``stale_upload_s``: several API processes may share the folder, and a live upload in any of them writes
its file or extracts its members at least that often (the age is that of the newest file in the entry).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.archive import STAGED_PREFIX
from service.db import TaskStore
from service.settings import Settings

logger = logging.getLogger(__name__)

UPLOAD_PART_PREFIX = "incoming-"  # the spool files of request bodies (service.api.upload writes them)


@dataclass(frozen=True)
class Removed:
    """What one clean-up deleted: staging entries and the bytes of their files."""

    entries: int = 0
    bytes: int = 0


def _last_write(entry: Path) -> float:
    """The newest modification time of ``entry`` and, for a folder, of everything under it."""
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for path in entry.rglob("*"):
            newest = max(newest, path.lstat().st_mtime)
    return newest


def _size(entry: Path) -> int:
    if entry.is_dir() and not entry.is_symlink():
        return sum(p.lstat().st_size for p in entry.rglob("*") if not p.is_dir() or p.is_symlink())
    return entry.lstat().st_size


def remove_leftovers(staging_dir: Path, owned: set[str], stale_after_s: float) -> Removed:
    """Deletes the ``incoming-*`` and ``upload-*`` entries of ``staging_dir`` that are leftovers.

    Args:
        staging_dir: The staging folder (missing: nothing to do).
        owned: Names of the entries unfinished tasks own (kept whatever their age).
        stale_after_s: An unowned entry nothing wrote to for this long is deleted.

    Returns:
        The entries deleted and their bytes. An entry that vanishes meanwhile (its upload ended, or
        another process cleaned it) is skipped.
    """
    if not staging_dir.is_dir():
        return Removed()
    entries, removed_bytes = 0, 0
    for entry in staging_dir.iterdir():
        if entry.name in owned or not entry.name.startswith((UPLOAD_PART_PREFIX, STAGED_PREFIX)):
            continue
        try:
            if time.time() - _last_write(entry) < stale_after_s:
                continue
            size = _size(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            logger.warning("could not delete the leftover upload %s: %s", entry, err)
            continue
        entries += 1
        removed_bytes += size
    return Removed(entries, removed_bytes)


def clean_staging(settings: Settings, store: TaskStore) -> Removed:
    """Deletes the leftover uploads of the settings' staging folder (see the module docstring)."""
    owned = {path.name for path in store.unfinished_datasets()}
    removed = remove_leftovers(settings.staging_dir, owned, settings.stale_upload_s)
    if removed.entries:
        logger.warning(
            "deleted %d leftover upload(s) from %s (%d bytes): no task owned them",
            removed.entries,
            settings.staging_dir,
            removed.bytes,
        )
    return removed


def clean_staging_in_background(settings: Settings, store: TaskStore) -> threading.Thread:
    """Runs :func:`clean_staging` in a daemon thread (an API start does not wait for it); logs a failure."""

    def run() -> None:
        try:
            clean_staging(settings, store)
        except Exception:  # the database may be unreachable at start; the worker's sweep cleans later
            logger.exception("cleaning the staging folder %s failed", settings.staging_dir)

    thread = threading.Thread(target=run, name="incseg-staging-cleanup", daemon=True)
    thread.start()
    return thread
