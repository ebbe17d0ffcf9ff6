"""Durable writes: a file or a tree is on disk before anyone can see it under its final name.

A write goes to a uniquely named temporary sibling, is fsynced, renamed over the final path (atomic on one
file system), and the parent directory is fsynced so that the rename itself survives a crash. Readers see
the old content or the new one, never a partial file; concurrent writers never share a temporary name and
the last rename wins.

Torch-free: the model directory (``training.model_dir``), the ONNX export (``export``) and the service's
registry all write through these functions.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

FILE_MODE = 0o644  # readable by a serving process running as another user
DIR_MODE = 0o755


def fsync_path(path: Path) -> None:
    """Flushes one file, or one directory's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_tree(root: Path) -> dict[str, int]:
    """Fsyncs every file and directory under ``root`` (deepest first); files 0644, directories 0755.

    Returns:
        Relative path -> size in bytes of every file, sorted by path.
    """
    root = Path(root)
    files = {}
    for directory, subdirs, names in os.walk(root, topdown=False):
        base = Path(directory)
        for name in names:
            path = base / name
            path.chmod(FILE_MODE)
            fsync_path(path)
            files[path.relative_to(root).as_posix()] = path.stat().st_size
        for name in subdirs:
            fsync_path(base / name)
        base.chmod(DIR_MODE)
    fsync_path(root)
    return dict(sorted(files.items()))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Writes ``data`` to ``path``: a temporary sibling, fsynced, renamed over it, the folder fsynced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
