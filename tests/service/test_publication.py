"""Publish -> activate -> done, in-process (no Celery), on SQLite: a worker dying at each point, a soft time
limit after activation, a cancellation and a rollback racing the activation.

A worker "dies" by raising :class:`WorkerDied` (not an ``Exception``: nothing in the pipeline catches it, the
row stays as the dead worker left it) under the identity of a process that has exited, so the next claim
takes the task over at once, as a live worker takes over from a SIGKILLed one.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded

import service.pipeline
from service.db import ClaimOutcome, TaskConflict, TaskState, TaskStore
from service.pipeline import run_task
from service.registry import ActivationConflict, Registry
from service.settings import Settings
from tests.service.conftest import image_files, make_dataset_archive, publish_tiny_version, stage_dataset


class WorkerDied(BaseException):
    """The worker process ended here (SIGKILL, power loss)."""


def dead_worker() -> str:
    """The holder identity (``host::pid``) of a process that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{socket.gethostname()}::{process.pid}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    task_store = TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")
    yield task_store
    task_store.dispose()


def _submit(store: TaskStore, settings: Settings, tmp_path: Path, known: list[str]) -> str:
    staged = stage_dataset(settings, make_dataset_archive(tmp_path, 3, seed=2), known)
    return store.create("mib", {"epochs": 1}, staged.new_classes, staged.path).id


def _die_after(method: Callable) -> Callable:
    """``method`` that runs, then kills the worker (once)."""
    calls: list[object] = []

    def dying(*args, **kwargs):
        result = method(*args, **kwargs)
        if not calls:
            calls.append(result)
            raise WorkerDied(method.__name__)
        return result

    return dying


def _die_before(method: Callable) -> Callable:
    """``method`` that kills the worker before it runs (once)."""
    calls: list[object] = []

    def dying(*args, **kwargs):
        if not calls:
            calls.append(args)
            raise WorkerDied(method.__name__)
        return method(*args, **kwargs)

    return dying


POINTS = {
    # the version directory is renamed into place; the row does not name it yet
    "after publish": lambda store, registry, mp: mp.setattr(
        registry, "publish", _die_after(registry.publish)
    ),
    # the row names the version; it is not active
    "after the record": lambda store, registry, mp: mp.setattr(
        store, "stage_version", _die_after(store.stage_version)
    ),
    # the version is active; the task is not done and its dataset is still there
    "after activation": lambda store, registry, mp: mp.setattr(
        service.pipeline, "announce", _die_before(service.pipeline.announce)
    ),
    # the version is active and the dataset deleted; the task is not done
    "before done": lambda store, registry, mp: mp.setattr(store, "finish", _die_before(store.finish)),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_takeover_finishes_the_publication_of_a_dead_worker(
    point: str,
    store: TaskStore,
    settings: Settings,
    active_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = active_registry
    task_id = _submit(store, settings, tmp_path, registry.get("v1").classes)
    with monkeypatch.context() as patch:
        POINTS[point](store, registry, patch)
        with pytest.raises(WorkerDied):
            run_task(task_id, settings, store, registry, worker=dead_worker())
    assert store.get(task_id).state == TaskState.EXPORTING
    assert [info.name for info in registry.versions()] == ["v1", "v2"]

    claim = run_task(task_id, settings, store, registry)  # a live worker takes the orphan over
    task = claim.task
    assert claim.outcome == ClaimOutcome.RUN and task.state == TaskState.DONE, task.error
    assert (task.attempts, task.base_version, task.model_version) == (2, "v1", "v2")
    assert registry.active() == "v2" and [info.name for info in registry.versions()] == ["v1", "v2"]
    assert task.metrics is not None and task.metrics == registry.get("v2").metrics
    assert image_files(settings.data_dir) == [] and store.dataset_dir(task_id) is None


def test_a_soft_time_limit_after_activation_leaves_the_task_done(
    store: TaskStore,
    settings: Settings,
    active_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def time_is_up(*_: object) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(service.pipeline, "announce", time_is_up)
    task_id = _submit(store, settings, tmp_path, active_registry.get("v1").classes)
    task = run_task(task_id, settings, store, active_registry).task
    assert task.state == TaskState.DONE and task.error is None and task.model_version == "v2"
    assert active_registry.active() == "v2" and image_files(settings.data_dir) == []


def test_a_cancel_after_the_publishing_check_is_honoured(
    store: TaskStore,
    settings: Settings,
    active_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``DELETE`` arrives while the version is being published: the task ends cancelled, nothing activated."""
    registry = active_registry
    task_id = _submit(store, settings, tmp_path, registry.get("v1").classes)
    publish = registry.publish

    def publish_with_a_cancel_arriving(*args, **kwargs):
        assert store.request_cancel(task_id).state == TaskState.EXPORTING
        return publish(*args, **kwargs)

    monkeypatch.setattr(registry, "publish", publish_with_a_cancel_arriving)
    task = run_task(task_id, settings, store, registry).task
    assert task.state == TaskState.CANCELLED and task.model_version is None
    assert task.error is not None
    assert "v2 was published but not activated" in task.error and "(v1) is unchanged" in task.error
    assert registry.active() == "v1" and image_files(settings.data_dir) == []


def test_a_cancel_once_the_version_is_recorded_is_a_conflict(
    store: TaskStore,
    settings: Settings,
    active_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``DELETE`` after the worker recorded its version: 409 naming the way back; the task ends done."""
    registry = active_registry
    task_id = _submit(store, settings, tmp_path, registry.get("v1").classes)
    activate = registry.activate
    refusals = []

    def activate_with_a_cancel_arriving(*args, **kwargs):
        with pytest.raises(TaskConflict) as refused:
            store.request_cancel(task_id)
        refusals.append(str(refused.value))
        return activate(*args, **kwargs)

    monkeypatch.setattr(registry, "activate", activate_with_a_cancel_arriving)
    task = run_task(task_id, settings, store, registry).task
    assert task.state == TaskState.DONE and task.model_version == "v2" and not task.cancel_requested
    assert len(refusals) == 1 and "already published v2" in refusals[0]
    assert "POST /models/v1/activate" in refusals[0]


def test_a_rollback_racing_the_activation_wins(
    store: TaskStore,
    settings: Settings,
    active_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rollback to v1 lands between the worker's read of the active version (its base v2) and its write."""
    registry = active_registry
    registry.activate(publish_tiny_version(registry, ["background", "a", "b"]).name)
    task_id = _submit(store, settings, tmp_path, registry.get("v2").classes)
    activate = registry.activate

    def activate_after_a_rollback(name: str, *args, **kwargs):
        if name == "v3":
            activate("v1")  # POST /models/v1/activate, just before the worker's swap
        return activate(name, *args, **kwargs)

    monkeypatch.setattr(registry, "activate", activate_after_a_rollback)
    task = run_task(task_id, settings, store, registry).task
    assert task.state == TaskState.FAILED and task.model_version == "v3"
    assert task.error is not None
    assert "changed from v2 to v1" in task.error and "POST /models/v3/activate" in task.error
    assert registry.active() == "v1"


def test_activation_is_a_compare_and_swap(active_registry: Registry) -> None:
    registry = active_registry
    second = publish_tiny_version(registry, ["background", "a", "b"]).name
    with pytest.raises(ActivationConflict, match="v1 is active, not v3"):
        registry.activate(second, expected="v3")
    with pytest.raises(ActivationConflict, match="v1 is active, not no version"):
        registry.activate(second, expected=None)
    assert registry.active() == "v1"
    registry.activate(second, expected="v1")
    assert registry.active() == second
