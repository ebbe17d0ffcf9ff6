"""The one durable-write helper used by the model directory, the ONNX export and the registry."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from training import durable


def test_write_atomic_replaces_the_file_readable_by_others_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ACTIVE"
    target.write_text("v1\n")
    durable.write_atomic(target, "v2\n")
    durable.write_atomic(tmp_path / "blob", b"\x00\x01")
    assert target.read_text() == "v2\n" and (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == durable.FILE_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ACTIVE", "blob"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        durable.write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_sync_tree_lists_every_file_and_opens_the_modes(tmp_path: Path) -> None:
    (tmp_path / "model" / "state").mkdir(parents=True)
    (tmp_path / "model" / "weights.pt").write_bytes(b"w" * 10)
    (tmp_path / "model" / "state" / "memory.pt").write_bytes(b"m" * 3)
    (tmp_path / "model").chmod(0o700)
    files = durable.sync_tree(tmp_path)
    assert files == {"model/state/memory.pt": 3, "model/weights.pt": 10}
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == durable.DIR_MODE
