"""Model loaders for :class:`service.model_server.ModelServer` (its ``loader=``) that fail or block on cue.

Both open the real export on ONNX Runtime CPU once they let a load through.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from export.runtime import SegmentationRuntime
from service.model_server import open_export
from service.settings import Settings


class FlakyLoader:
    """Each load of ``version`` raises for its first ``failures`` attempts (transient I/O errors), then opens.

    Attributes:
        attempts: ``time.monotonic()`` at the start of each attempt at ``version``.
    """

    def __init__(self, settings: Settings, version: str, failures: int) -> None:
        self.settings = settings
        self.version = version
        self.failures = failures
        self.attempts: list[float] = []

    def __call__(self, export_dir: Path) -> SegmentationRuntime:
        if export_dir.parent.name == self.version:
            self.attempts.append(time.monotonic())
            if len(self.attempts) <= self.failures:
                raise OSError(f"injected transient read error {len(self.attempts)}")
        return open_export(export_dir, self.settings, "ort-cpu")


class BlockingLoader:
    """Each load of ``version`` waits at its start for :attr:`release`; :attr:`entered` says one began.

    With ``version`` None no load waits.
    """

    def __init__(self, settings: Settings, version: str | None) -> None:
        self.settings = settings
        self.version = version
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, export_dir: Path) -> SegmentationRuntime:
        if export_dir.parent.name == self.version:
            self.entered.set()
            if not self.release.wait(120):
                raise TimeoutError("the test never released the load")
        return open_export(export_dir, self.settings, "ort-cpu")
