"""Every way of losing a queued task's message, with a real Redis and real worker processes.

The task table is the outbox: each send and each delivery of a task's message is recorded, and a worker's
sweep sends a new message for a queued task whose message was not seen for ``resend_after_s`` (3 s here)
while no step runs. Each test loses the message one way and measures how long after the model line was
free the task ended ``done``; without the sweep each task stays queued for good (or, for the message held
by a killed worker, until Redis's visibility timeout of 7 h).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.db import TaskState, TaskStore, TaskView
from service.jobs import submit_task
from tests.faults.conftest import FaultStack
from tests.service.conftest import (
    finished,
    image_files,
    make_dataset_archive,
    publish_tiny_version,
    stage_dataset,
)
from tests.service.conftest import wait_for as wait_for_task

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

# a few seconds of training for the tiny model (a minute on a loaded machine): long enough to lose the next
# task's message while it runs
EPOCHS = 4
# the task must end within this many seconds of the line being free: the sweep period (1.5 s) plus the
# re-send delay (3 s) plus a tiny step (one epoch) on a loaded 2-core machine
BOUND_S = 90


def _training(task: TaskView) -> bool:
    return task.phase == "training" and task.fraction > 0


def _queue_length(stack: FaultStack) -> int:
    return int(stack.redis.cli("llen", stack.settings.train_queue).stdout.strip())


@pytest.fixture
def store(stack: FaultStack) -> TaskStore:
    registry = stack.registry
    registry.activate(publish_tiny_version(registry, ["background", "a", "b"]).name)
    return TaskStore(stack.settings.task_database_url)


def _submit(stack: FaultStack, store: TaskStore, tmp_path: Path, num_classes: int, epochs: int) -> TaskView:
    """Submits a task as the API does; the next task must add classes the one before did not."""
    archive = make_dataset_archive(tmp_path, num_classes, seed=num_classes)
    staged = stage_dataset(stack.settings, archive, ["background", "a", "b"])
    return submit_task(store, stack.settings, staged, "mib", {"epochs": epochs})


def _wait_done(store: TaskStore, task_id: str, since: float) -> float:
    """Waits until the task is finished, asserts it is done; returns the seconds since ``since``."""
    task = wait_for_task(store, task_id, finished, timeout_s=BOUND_S)
    assert task.state == TaskState.DONE, task.error
    return time.monotonic() - since


def test_a_task_row_without_message_runs(stack: FaultStack, store: TaskStore, tmp_path: Path) -> None:
    """The API died between recording the task and sending its message: the row exists, no message."""
    worker = stack.start_worker()
    staged = stage_dataset(
        stack.settings, make_dataset_archive(tmp_path, 3, seed=2), ["background", "a", "b"]
    )
    task = store.create("mib", {"epochs": 1}, staged.new_classes, staged.path)
    created = time.monotonic()
    assert _queue_length(stack) == 0
    seconds = _wait_done(store, task.id, created)
    assert f"task {task.id} re-sent" in worker.log()
    assert store.get(task.id).attempts == 1 and image_files(stack.settings.staging_dir) == []
    print(f"\nrow without message: done {seconds:.1f} s after the row was recorded")


def test_a_message_flushed_from_redis_is_sent_again(
    stack: FaultStack, store: TaskStore, tmp_path: Path
) -> None:
    """FLUSHDB (or an eviction) while the message of a queued task waits in Redis behind a running step."""
    worker = stack.start_worker()
    running = _submit(stack, store, tmp_path, 3, EPOCHS)
    wait_for_task(store, running.id, _training, timeout_s=120)
    queued = _submit(stack, store, tmp_path, 4, 1)
    assert _queue_length(stack) == 1, "the queued task's message waits in Redis"
    assert stack.redis.cli("flushdb").stdout.strip() == "OK"
    assert _queue_length(stack) == 0
    first = wait_for_task(store, running.id, finished, timeout_s=240)
    assert first.state == TaskState.DONE, first.error
    line_free = time.monotonic()
    seconds = _wait_done(store, queued.id, line_free)
    assert f"task {queued.id} re-sent" in worker.log()
    assert store.get(queued.id).base_version == first.model_version
    print(f"\nmessage flushed from Redis: done {seconds:.1f} s after the step before it ended")


def test_a_worker_killed_holding_a_countdown_retry(
    stack: FaultStack, store: TaskStore, tmp_path: Path
) -> None:
    """The queued task's message is held by a worker (a countdown retry: the line is busy) that is killed:
    Redis would give it back only after the visibility timeout."""
    workers = [stack.start_worker(), stack.start_worker()]
    running = _submit(stack, store, tmp_path, 3, EPOCHS)
    wait_for_task(store, running.id, _training, timeout_s=120)
    queued = _submit(stack, store, tmp_path, 4, 1)
    waiting = f"task {queued.id}: wait (after task {running.id} (running))"
    deadline = time.monotonic() + 60
    while not any(waiting in worker.log() for worker in workers):
        assert time.monotonic() < deadline, "no worker delivered the queued task"
        time.sleep(0.1)
    holder = next(worker for worker in workers if waiting in worker.log())
    # the other worker runs the first task, so it cannot take the queued task's message: the holder is the
    # only one that can. It re-sends the message every line_wait_s, so freeze it, and kill it only when,
    # frozen, it holds the message: none in the queue, A's and B's unacknowledged (kombu's "unacked")
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the waiting worker never held the queued task's message"
        holder.freeze()
        if _queue_length(stack) == 0 and stack.redis.cli("hlen", "unacked").stdout.strip() == "2":
            break
        holder.thaw()
        time.sleep(0.05)
    holder.kill()
    assert _queue_length(stack) == 0 and stack.redis.cli("hlen", "unacked").stdout.strip() == "2"
    assert store.get(running.id).state in (TaskState.RUNNING, TaskState.EXPORTING), "the kill came too late"
    survivor = next(worker for worker in workers if worker is not holder)
    first = wait_for_task(store, running.id, finished, timeout_s=240)
    assert first.state == TaskState.DONE, first.error
    line_free = time.monotonic()
    seconds = _wait_done(store, queued.id, line_free)
    assert f"task {queued.id} re-sent" in survivor.log()
    print(f"\nworker killed holding a countdown retry: done {seconds:.1f} s after the step before it ended")
