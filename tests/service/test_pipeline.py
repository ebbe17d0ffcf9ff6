"""run_task in-process (no Celery) on SQLite and PostgreSQL: the step, export, parity gate, publication,
progress phases, cancellation and the deletion of the staged data."""

from __future__ import annotations

import errno
import functools
import threading
from pathlib import Path

import pytest

import export.onnx_export
from service.db import Claim, ClaimOutcome, TaskState, TaskStore
from service.pipeline import CPU_MODEL_OPTIONS, DiskFull, LostTask, disk_full_guard, run_task, step_options
from service.registry import Registry
from service.settings import Settings
from tests.service.conftest import image_files, make_dataset_archive, stage_dataset, wait_for


class RecordingStore(TaskStore):
    """The task store, noting every progress write (to check phases and throttling)."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self.writes: list[tuple[str, float | None]] = []

    def progress(
        self,
        task_id: str,
        worker: str,
        phase: str,
        epoch: int | None = None,
        fraction: float | None = None,
        loss: float | None = None,
        state: TaskState | None = None,
    ) -> bool:
        self.writes.append((phase, fraction))
        return super().progress(
            task_id, worker, phase, epoch=epoch, fraction=fraction, loss=loss, state=state
        )


@pytest.fixture
def recording_store(database_url: str):
    store = RecordingStore(database_url)
    yield store
    store.dispose()


def _submit(store: TaskStore, settings: Settings, archive: Path, known: list[str], **options) -> str:
    staged = stage_dataset(settings, archive, known)
    return store.create("mib", options, staged.new_classes, staged.path).id


def test_step0_then_incremental_step(
    recording_store: RecordingStore, settings: Settings, registry: Registry, tmp_path: Path
) -> None:
    store = recording_store
    first = _submit(store, settings, make_dataset_archive(tmp_path, 2, seed=1), ["background"])
    claim = run_task(first, settings, store, registry)
    task = claim.task
    assert claim.outcome == ClaimOutcome.RUN and task.state == TaskState.DONE, task.error
    assert (task.model_version, task.base_version, task.attempts, task.fraction) == ("v1", None, 1, 1.0)
    assert registry.active() == "v1" and task.metrics is not None and task.metrics["miou_all"] is not None
    phases = [phase for phase, _ in store.writes]
    expected = [
        "checking-data",
        "preparing",
        "training",
        "end-of-step",
        "evaluating",
        "saving",
        "exporting",
        "tensorrt",
        "publishing",
    ]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == expected
    info = registry.get("v1")
    assert info.task_id == first and info.parity_passed and info.engine.startswith("not built")
    assert info.classes == ["background", "red_circle_plain", "azure_square_striped"]

    second = _submit(store, settings, make_dataset_archive(tmp_path, 3, seed=2), info.classes, epochs=2)
    task = run_task(second, settings, store, registry).task
    assert task.state == TaskState.DONE and task.model_version == "v2" and task.base_version == "v1"
    assert registry.active() == "v2" and registry.get("v2").classes[-1] == "lime_triangle_dotted"
    assert task.options == {"epochs": 2} and registry.get("v2").history[-1]["options"]["epochs"] == 2
    assert image_files(settings.data_dir) == [], "staged images and masks are deleted"
    assert list(settings.staging_dir.iterdir()) == []


def test_progress_writes_are_throttled(
    recording_store: RecordingStore, settings: Settings, tmp_path: Path
) -> None:
    """With a one-hour interval, training writes only its first and its last iteration (of 12)."""
    slow = settings.model_copy(update={"progress_interval_s": 3600.0})
    registry = Registry(slow.registry_dir)
    task_id = _submit(
        recording_store, slow, make_dataset_archive(tmp_path, 2, seed=1), ["background"], epochs=3
    )
    assert run_task(task_id, slow, recording_store, registry).task.state == TaskState.DONE
    training = [fraction for phase, fraction in recording_store.writes if phase == "training"]
    assert training == [pytest.approx(1 / 12), 1.0]


def test_parity_failure_fails_the_task_and_activates_nothing(
    store: TaskStore, settings: Settings, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a gate no export can pass (a negative tolerance): the real check runs and reports its real numbers
    strict = functools.partial(export.onnx_export.export_onnx, max_abs_tol=-1.0)
    monkeypatch.setattr(export.onnx_export, "export_onnx", strict)
    task_id = _submit(store, settings, make_dataset_archive(tmp_path, 2, seed=1), ["background"])
    task = run_task(task_id, settings, store, registry).task
    assert task.state == TaskState.FAILED and task.model_version is None
    assert task.error is not None
    assert "parity gate failed" in task.error and "max abs logit error" in task.error
    assert "nothing was activated" in task.error
    assert registry.active() is None and registry.versions() == []
    assert image_files(settings.data_dir) == [] and list(registry.root.iterdir()) == []


def test_cancel_a_running_task(
    store: TaskStore, settings: Settings, active_registry: Registry, tmp_path: Path
) -> None:
    known = active_registry.get("v1").classes
    task_id = _submit(store, settings, make_dataset_archive(tmp_path, 3, seed=2), known, epochs=200)
    outcome: dict[str, Claim] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(claim=run_task(task_id, settings, store, active_registry))
    )
    runner.start()
    wait_for(store, task_id, lambda task: task.phase == "training" and task.fraction > 0, timeout_s=120)
    assert store.request_cancel(task_id).state == TaskState.RUNNING  # the worker stops it at its next check
    runner.join(timeout=120)
    task = outcome["claim"].task
    assert task.state == TaskState.CANCELLED and task.finished_at is not None
    assert task.error is not None and "on request" in task.error and task.fraction < 1
    assert active_registry.active() == "v1" and [v.name for v in active_registry.versions()] == ["v1"]
    assert image_files(settings.data_dir) == []


def test_missing_dataset_and_duplicate_delivery(
    store: TaskStore, settings: Settings, registry: Registry
) -> None:
    task_id = store.create("mib", {}, ["x"], settings.staging_dir / "upload-gone").id
    task = run_task(task_id, settings, store, registry).task
    assert task.state == TaskState.FAILED and task.error is not None
    assert "staged dataset" in task.error and "is gone" in task.error
    again = run_task(task_id, settings, store, registry)
    assert again.outcome == ClaimOutcome.DROP and again.task.state == TaskState.FAILED


@pytest.mark.parametrize("cuda", [False, True])
def test_step_options_are_sized_for_the_machine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cuda: bool
) -> None:
    """Without CUDA a step 0 builds the CPU model; settings' and the task's own options still win."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    plain = Settings(_env_file=None, data_dir=tmp_path)
    options = step_options(plain, {})
    expected = {"backbone": "resnet18", "context_channels": 128, "embed_channels": 256}
    if not cuda:
        expected = CPU_MODEL_OPTIONS
    assert {k: getattr(options, k) for k in expected} == expected
    assert options.epochs == plain.default_epochs and options.size == plain.default_size
    pinned = Settings(_env_file=None, data_dir=tmp_path, step_options={"backbone": "resnet50"})
    assert step_options(pinned, {}).backbone == "resnet50"
    assert step_options(pinned, {"backbone": "resnet18", "epochs": 3}).model_dump()["epochs"] == 3
    assert step_options(pinned, {"backbone": "resnet18"}).backbone == "resnet18"


def test_disk_full_guard_names_a_full_disk_and_lets_other_errors_through(tmp_path: Path) -> None:
    """ENOSPC anywhere in the chain is a full disk; other errors, with room left, pass unchanged (the
    errno-less torch error on a really full file system: tests/faults/test_disk_full.py)."""
    with pytest.raises(
        DiskFull, match=r"disk of the model registry is full: \d+ bytes free .*\(v3\) is unchanged"
    ):
        with disk_full_guard(tmp_path, "v3"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as error:
                raise RuntimeError("writer failed") from error
    for failure in (
        RuntimeError("unexpected pos 10 vs 8"),
        OSError(errno.EACCES, "denied"),
        LostTask("taken"),
    ):
        with pytest.raises(type(failure)) as raised, disk_full_guard(tmp_path, "v3"):
            raise failure
        assert raised.value is failure
