"""The model registry: one immutable directory per version on a volume, and a pointer to the active one.

Layout::

    REGISTRY/ACTIVE                 name of the active version ("v3\\n"), replaced atomically
    REGISTRY/.lock                  lock file: activations take it (``flock``), one at a time
    REGISTRY/v3/version.json        VersionInfo (classes, history, metrics, parity, files, task)
    REGISTRY/v3/model/              model directory (model.json, weights.pt, state/*.pt: method state)
    REGISTRY/v3/export/             ONNX export (manifest.json with parity figures, model.onnx) and the
                                    TensorRT engine (engine.plan, engine_manifest.json) when one was built
    REGISTRY/v3/metrics.json        the step's validation metrics
    REGISTRY/.stage-*/              a version being written (invisible to readers)

A version is written into a staging directory inside the registry (same filesystem), its files and
directories fsynced, then renamed to the next free name: a crash leaves either nothing or a whole version,
and a published version is never rewritten. Two publishers racing for a name both succeed: the loser of
the rename takes the next name. Only a version whose ONNX export passed the parity gate can be activated.

Activation is a compare-and-swap under an exclusive ``flock`` of ``REGISTRY/.lock``: a worker activates its
version only if its base is still the active one, and the API's activation only if no other activation came
between its read and its write, so a rollback is never silently overwritten.

This module imports no torch (the API process reads the registry).
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, computed_field

from training.durable import DIR_MODE, fsync_path, sync_tree, write_atomic

ACTIVE_FILE = "ACTIVE"
LOCK_FILE = ".lock"
VERSION_FILE = "version.json"
METRICS_FILE = "metrics.json"
MODEL_SUBDIR = "model"
EXPORT_SUBDIR = "export"
MODEL_JSON = "model.json"
MANIFEST_JSON = "manifest.json"
STAGE_PREFIX = ".stage-"
NAME_PATTERN = re.compile(r"^v([1-9][0-9]{0,8})$")


class Expect(enum.Enum):
    """``Registry.activate(expected=Expect.ANY)``: activate whatever version is active now."""

    ANY = "any"


class ActivationConflict(RuntimeError):
    """Another version than the expected one is active: the compare-and-swap of an activation failed.

    Args:
        name: The version that was to be activated.
        expected: The version the caller expected to be active.
        active: The version active instead.
    """

    def __init__(self, name: str, expected: str | None, active: str | None) -> None:
        super().__init__(
            f"{name} was not activated: {active or 'no version'} is active, not {expected or 'no version'} "
            "(another activation came first)"
        )
        self.name, self.expected, self.active = name, expected, active


class VersionInfo(BaseModel):
    """One published model version (``version.json``; the name is the directory's)."""

    name: str = Field(description='"v1", "v2", ... in the order published')
    created_at: datetime
    classes: list[str] = Field(description="class names in model order, index 0 = background")
    history: list[dict[str, Any]] = Field(description="one record per training step")
    metrics: dict[str, Any] | None = Field(None, description="validation metrics of the step that made it")
    parity: dict[str, Any] = Field(description="ONNX Runtime vs PyTorch parity report of the export")
    parity_passed: bool
    files: dict[str, int] = Field(description="relative path -> bytes")
    task_id: str | None = Field(None, description="task that trained the version")
    base_version: str | None = Field(None, description="version the step started from (None for step 0)")
    engine: str = Field(description='TensorRT engine: "built: ..." or "not built: <reason>"')
    int8: dict[str, Any] | None = Field(
        None,
        description="INT8 models (INCSEG_INT8), cpu (ONNX Runtime) and tensorrt: passed (the gate: agreement "
        "with FP32 >= 99 %, mIoU loss <= 1 point; a failed one is never served, FP32 serves instead) and "
        "parity; calibration: how the table was made; None: none made",
    )

    @computed_field(  # type: ignore[prop-decorator]
        description="supervision of the step that made it: full (masks) or weak (image-level labels)"
    )
    @property
    def supervision(self) -> Literal["full", "weak"]:
        """The last history record's ``supervision``; records written before weak labels read as full."""
        return "weak" if self.history and self.history[-1].get("supervision") == "weak" else "full"


def _int8_summary(entry: dict | None) -> dict | None:
    """What ``/models`` shows of an export's INT8 entry: each model's verdict and figures, the calibration."""
    if entry is None:
        return None
    models = {
        target: {key: entry[target][key] for key in ("passed", "parity")} for target in ("cpu", "tensorrt")
    }
    return {**models, "calibration": entry["calibration"]}


def version_number(name: str) -> int:
    """The number of a version name (``v12`` -> 12).

    Raises:
        KeyError: ``name`` is not a version name (this also keeps paths out of the registry).
    """
    match = NAME_PATTERN.match(name)
    if match is None:
        raise KeyError(f"{name!r} is not a version name (v1, v2, ...)")
    return int(match.group(1))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot be read as JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


class Registry:
    """Model versions under ``root`` (created if missing).

    Args:
        root: The registry directory (``Settings.registry_dir``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[VersionInfo]:
        """Every published version, oldest first."""
        names = [path.name for path in self.root.iterdir() if NAME_PATTERN.match(path.name)]
        return [self.get(name) for name in sorted(names, key=version_number)]

    def get(self, name: str) -> VersionInfo:
        """The version ``name``.

        Raises:
            KeyError: No such version.
            ValueError: Its ``version.json`` is damaged (the message names the file).
        """
        version_number(name)
        path = self.root / name / VERSION_FILE
        if not path.is_file():
            raise KeyError(f"no model version {name!r}")
        try:
            return VersionInfo.model_validate({**_read_json(path), "name": name})
        except ValidationError as err:
            raise ValueError(f"{path}: {err}") from err

    def active(self) -> str | None:
        """Name of the active version, or None before the first activation."""
        try:
            name = (self.root / ACTIVE_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def activate(self, name: str, expected: str | None | Expect = Expect.ANY) -> VersionInfo:
        """Points ``ACTIVE`` at ``name`` (atomic: readers see the old or the new name, never none).

        Args:
            name: The version to activate.
            expected: The version that must be active for the swap (None: none may be active yet); checked
                and swapped under the registry's lock. ``Expect.ANY`` swaps whatever is active.

        Raises:
            KeyError: No such version.
            ValueError: The version did not pass the parity gate.
            ActivationConflict: Another version than ``expected`` is active; nothing changed.
        """
        info = self.get(name)
        if not info.parity_passed:
            raise ValueError(
                f"version {name} did not pass the parity gate (ONNX Runtime vs PyTorch: "
                f"max abs error {info.parity.get('max_abs_error')}, argmax agreement "
                f"{info.parity.get('argmax_agreement')}); it cannot be activated"
            )
        with self.locked():
            active = self.active()
            if expected is not Expect.ANY and active != expected:
                raise ActivationConflict(name, expected, active)
            write_atomic(self.root / ACTIVE_FILE, f"{name}\n")
        return info

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the registry's exclusive lock (``flock`` of ``REGISTRY/.lock``, across processes)."""
        with open(self.root / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def published_by(self, task_id: str) -> VersionInfo | None:
        """The version published by task ``task_id`` (the newest if several), or None.

        Versions whose ``version.json`` cannot be read are skipped.
        """
        names = [path.name for path in self.root.iterdir() if NAME_PATTERN.match(path.name)]
        for name in sorted(names, key=version_number, reverse=True):
            try:
                info = self.get(name)
            except (KeyError, ValueError):
                continue
            if info.task_id == task_id:
                return info
        return None

    def version_dir(self, name: str) -> Path:
        """Directory of a published version.

        Raises:
            KeyError: No such version.
        """
        self.get(name)
        return self.root / name

    def model_dir(self, name: str) -> Path:
        """Model directory of a version (``training.model_dir`` layout)."""
        return self.version_dir(name) / MODEL_SUBDIR

    def export_dir(self, name: str) -> Path:
        """ONNX export directory of a version (manifest.json, model.onnx, the engine if built)."""
        return self.version_dir(name) / EXPORT_SUBDIR

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh staging directory inside the registry, removed on exit unless it was published.

        Write ``STAGE/model`` and ``STAGE/export`` into it, then call :meth:`publish`.
        """
        stage = self.root / f"{STAGE_PREFIX}{uuid.uuid4().hex}"
        stage.mkdir(mode=DIR_MODE)
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def publish(
        self,
        stage: Path,
        *,
        metrics: dict | None,
        task_id: str | None,
        base_version: str | None,
        engine: str,
    ) -> VersionInfo:
        """Seals a staging directory and renames it to the next free version name.

        Classes and history come from ``STAGE/model/model.json``, the parity report from
        ``STAGE/export/manifest.json``.

        Returns:
            The published version (not activated).

        Raises:
            ValueError: The staging directory lacks the model or the export.
        """
        stage = Path(stage)
        if stage.parent != self.root or not stage.name.startswith(STAGE_PREFIX):
            raise ValueError(f"{stage} is not a staging directory of {self.root}")
        model = _read_json(stage / MODEL_SUBDIR / MODEL_JSON)
        manifest = _read_json(stage / EXPORT_SUBDIR / MANIFEST_JSON)
        (stage / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        files = sync_tree(stage)
        parity = manifest.get("parity") or {}
        info = {
            "created_at": datetime.now(UTC).isoformat(),
            "classes": model.get("classes", []),
            "history": model.get("history", []),
            "metrics": metrics,
            "parity": parity,
            "parity_passed": bool(parity.get("passed")),
            "files": files,
            "task_id": task_id,
            "base_version": base_version,
            "engine": engine,
            "int8": _int8_summary(manifest.get("int8")),
        }
        VersionInfo.model_validate({**info, "name": "v1"})  # fail before publishing, not on every read
        write_atomic(stage / VERSION_FILE, json.dumps(info, indent=2))
        name = self._rename_to_next_name(stage)
        fsync_path(self.root)
        return self.get(name)

    def remove_stale_stages(self, older_than_s: float) -> list[Path]:
        """Deletes staging directories left by crashed workers (older than ``older_than_s``)."""
        removed = []
        for path in self.root.glob(f"{STAGE_PREFIX}*"):
            if time.time() - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def _rename_to_next_name(self, stage: Path) -> str:
        """rename(2) onto a non-empty directory fails, so a name taken meanwhile is never overwritten."""
        for _ in range(1000):
            numbers = [version_number(p.name) for p in self.root.iterdir() if NAME_PATTERN.match(p.name)]
            name = f"v{max(numbers, default=0) + 1}"
            try:
                os.rename(stage, self.root / name)
            except OSError:
                if (self.root / name).exists():
                    continue  # another publisher took the name first
                raise
            return name
        raise RuntimeError(f"{self.root}: could not find a free version name")
