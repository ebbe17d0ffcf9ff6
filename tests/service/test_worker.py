"""Real Celery worker processes on the real Redis (and the embedded filesystem broker): the loop, the
model line's order across two workers, SIGKILL of a worker or of its pool process, the delivery cap."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from service.db import TaskState, TaskStore, TaskView
from service.db_schema import tasks_table
from service.jobs import cancel_task, submit_task
from service.registry import Registry
from service.settings import Settings
from service.train_queue import TRAIN_TASK, broker_queue_dir, sender_app
from tests.service.conftest import (
    WorkerProcess,
    finished,
    image_files,
    make_dataset_archive,
    stage_dataset,
    wait_for,
)

pytestmark = pytest.mark.timeout(600)


def _submit(settings: Settings, store: TaskStore, archive: Path, known: list[str], **options) -> TaskView:
    return submit_task(store, settings, stage_dataset(settings, archive, known), "mib", options)


def _holder_pid(store: TaskStore, task_id: str) -> int:
    with store.engine.connect() as conn:
        holder = conn.execute(select(tasks_table.c.worker).where(tasks_table.c.id == task_id)).scalar_one()
    return int(holder.rpartition(":")[2])


def _training(attempt: int) -> Callable[[TaskView], bool]:
    return lambda task: task.attempts == attempt and task.phase == "training" and task.fraction > 0


def test_two_workers_run_the_line_in_order(
    redis_settings: Settings, start_worker: Callable[[Settings], WorkerProcess], tmp_path: Path
) -> None:
    """Step 0 and an incremental step posted at once to two workers: one after the other, in order."""
    settings = redis_settings
    store, registry = TaskStore(settings.task_database_url), Registry(settings.registry_dir)
    workers = [start_worker(settings), start_worker(settings)]
    first = _submit(settings, store, make_dataset_archive(tmp_path, 2, seed=1), ["background"])
    second = _submit(settings, store, make_dataset_archive(tmp_path, 3, seed=2), ["background"])
    first_done = wait_for(store, first.id, finished)
    second_done = wait_for(store, second.id, finished)
    assert first_done.state == second_done.state == TaskState.DONE, (first_done.error, second_done.error)
    assert first_done.finished_at is not None and second_done.started_at is not None
    assert first_done.finished_at <= second_done.started_at, "the second step started after the first ended"
    assert (first_done.model_version, second_done.base_version, second_done.model_version) == (
        "v1",
        "v1",
        "v2",
    )
    assert registry.active() == "v2" and registry.get("v2").classes[-1] == "lime_triangle_dotted"
    assert first_done.attempts == second_done.attempts == 1
    logs = "".join(worker.log_path.read_text() for worker in workers)
    assert f"task {second.id}: wait (after task {first.id} (running))" in logs, "the idle worker waited"
    assert image_files(settings.data_dir) == [], "no image or mask of a finished task remains"


def test_sigkill_of_the_worker_requeues_on_restart(
    redis_settings: Settings,
    active_registry: Registry,
    start_worker: Callable[[Settings], WorkerProcess],
    tmp_path: Path,
) -> None:
    settings = redis_settings
    store = TaskStore(settings.task_database_url)
    worker = start_worker(settings)
    known = active_registry.get("v1").classes
    task = _submit(settings, store, make_dataset_archive(tmp_path, 3, seed=2), known, epochs=300)
    wait_for(store, task.id, _training(1))
    worker.kill()  # main and pool process: nobody is left to requeue the message
    assert store.get(task.id).state == TaskState.RUNNING
    assert active_registry.active() == "v1" and [v.name for v in active_registry.versions()] == ["v1"]
    start_worker(settings)  # start-up recovery: the holder is dead, the task is requeued and runs again
    retried = wait_for(store, task.id, _training(2))
    assert retried.state == TaskState.RUNNING and retried.base_version == "v1"
    cancel_task(store, settings, task.id)
    cancelled = wait_for(store, task.id, finished)
    assert cancelled.state == TaskState.CANCELLED and cancelled.attempts == 2
    assert active_registry.active() == "v1" and image_files(settings.data_dir) == []


def test_sigkill_of_the_pool_process_until_the_delivery_cap(
    redis_settings: Settings,
    active_registry: Registry,
    start_worker: Callable[[Settings], WorkerProcess],
    tmp_path: Path,
) -> None:
    """The worker requeues the message of a killed pool process; past max_deliveries the task fails."""
    settings = redis_settings.model_copy(update={"max_deliveries": 2})
    store = TaskStore(settings.task_database_url)
    start_worker(settings)
    known = active_registry.get("v1").classes
    task = _submit(settings, store, make_dataset_archive(tmp_path, 3, seed=2), known, epochs=300)
    for attempt in (1, 2):
        wait_for(store, task.id, _training(attempt))
        os.kill(_holder_pid(store, task.id), signal.SIGKILL)
    failed = wait_for(store, task.id, finished)
    # Two correct paths reach the cap: the redelivered message finds attempts == 2 ("gave up after"),
    # or the orphan sweep sees the dead holder of attempt 2 first ("died during attempt 2 of 2").
    assert failed.state == TaskState.FAILED and failed.attempts == 2
    assert failed.error is not None
    assert "gave up after 2 deliveries" in failed.error or "died during attempt 2 of 2" in failed.error
    assert active_registry.active() == "v1" and [v.name for v in active_registry.versions()] == ["v1"]
    assert image_files(settings.data_dir) == []


def test_embedded_broker_runs_a_task(
    settings: Settings, start_worker: Callable[[Settings], WorkerProcess], tmp_path: Path
) -> None:
    """No Redis: the filesystem broker under the data directory carries the message."""
    store, registry = TaskStore(settings.task_database_url), Registry(settings.registry_dir)
    task = _submit(settings, store, make_dataset_archive(tmp_path, 2, seed=1), ["background"])
    worker = start_worker(settings)  # a task queued before the worker starts is delivered too
    done = wait_for(store, task.id, finished)
    assert done.state == TaskState.DONE and done.model_version == "v1" and registry.active() == "v1"
    assert image_files(settings.data_dir) == []
    # Start-up recovery re-sent the queued task (unless its first delivery claimed it before): a duplicate,
    # to be dropped. One more duplicate sent now is handled after every earlier message (one at a time, in
    # the order sent), so once it has been handled nothing may have run again.
    last = sender_app(settings).send_task(
        TRAIN_TASK, args=[task.id], queue=settings.train_queue, ignore_result=True
    )
    worker.wait_log(f"[{last.id}] succeeded", 120)
    assert f"task {task.id}: drop (already done)" in worker.log()
    assert list(broker_queue_dir(settings).iterdir()) == []
    assert store.get(task.id).attempts == 1 and [v.name for v in registry.versions()] == ["v1"]
