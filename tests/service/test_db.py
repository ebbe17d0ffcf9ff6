"""The task table on SQLite and on the real PostgreSQL: life cycle, ordering lock, orphans, cancel."""

from __future__ import annotations

import logging
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, update

from service.db import (
    ClaimOutcome,
    TaskConflict,
    TaskNotFound,
    TaskState,
    TaskStore,
)
from service.db_schema import tasks_table
from service.holder import holder_alive, worker_id

ORPHAN_S = 30.0


def _create(store: TaskStore, name: str = "a") -> str:
    return store.create("mib", {"epochs": 1}, [name], Path("/nonexistent") / name).id


def test_create_get_list_newest_first(store: TaskStore) -> None:
    ids = [_create(store, str(i)) for i in range(5)]
    view = store.get(ids[0])
    assert view.state == TaskState.QUEUED and view.classes == ["0"] and view.attempts == 0
    assert view.created_at.tzinfo is not None
    page, total = store.page(offset=1, limit=2)
    assert total == 5
    assert [task.id for task in page] == [ids[3], ids[2]]
    assert store.counts()[TaskState.QUEUED] == 5 and store.counts()[TaskState.DONE] == 0
    with pytest.raises(TaskNotFound):
        store.get("missing")


def test_life_cycle_and_fencing(store: TaskStore) -> None:
    task_id = _create(store)
    claim = store.claim(task_id, "host:1", ORPHAN_S, 3, "v1")
    assert claim.outcome == ClaimOutcome.RUN
    assert (
        claim.task.state == TaskState.RUNNING and claim.task.attempts == 1 and claim.task.base_version == "v1"
    )
    assert store.progress(task_id, "host:1", "training", epoch=0, fraction=0.5, loss=1.25)
    assert not store.progress(task_id, "host:2", "training", fraction=0.9), "another worker does not hold it"
    view = store.get(task_id)
    assert (view.phase, view.epoch, view.fraction, view.loss) == ("training", 0, 0.5, 1.25)
    assert store.progress(task_id, "host:1", "exporting", state=TaskState.EXPORTING)
    done = store.finish(task_id, "host:1", "v2", {"miou_all": 0.5})
    assert done.state == TaskState.DONE and done.model_version == "v2" and done.finished_at is not None
    assert store.claim(task_id, "host:3", ORPHAN_S, 3, "v2").outcome == ClaimOutcome.DROP


def test_fifo_order_and_one_at_a_time(store: TaskStore) -> None:
    first, second = _create(store, "a"), _create(store, "b")
    wait = store.claim(second, "host:2", ORPHAN_S, 3, None)
    assert wait.outcome == ClaimOutcome.WAIT and first in wait.reason
    assert store.claim(first, "host:1", ORPHAN_S, 3, None).outcome == ClaimOutcome.RUN
    assert store.claim(second, "host:2", ORPHAN_S, 3, None).outcome == ClaimOutcome.WAIT
    assert store.claim(first, "host:3", ORPHAN_S, 3, None).outcome == ClaimOutcome.DROP, "a duplicate"
    store.fail(first, "host:1", "boom")
    assert store.claim(second, "host:2", ORPHAN_S, 3, None).outcome == ClaimOutcome.RUN


def test_concurrent_claims_one_winner(store: TaskStore) -> None:
    """Threads racing to claim different tasks: exactly the oldest one runs (serialised transaction)."""
    ids = [_create(store, str(i)) for i in range(4)]
    outcomes: dict[str, ClaimOutcome] = {}
    barrier = threading.Barrier(len(ids))

    def claim(task_id: str) -> None:
        barrier.wait()
        outcomes[task_id] = store.claim(task_id, f"host:{task_id}", ORPHAN_S, 3, None).outcome

    threads = [threading.Thread(target=claim, args=(task_id,)) for task_id in reversed(ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [outcomes[task_id] for task_id in ids] == [ClaimOutcome.RUN] + [ClaimOutcome.WAIT] * 3


def test_cancel(store: TaskStore) -> None:
    queued, running = _create(store, "a"), _create(store, "b")
    view = store.request_cancel(queued)
    assert view.state == TaskState.CANCELLED and view.finished_at is not None
    assert store.claim(running, "host:1", ORPHAN_S, 3, None).outcome == ClaimOutcome.RUN
    assert store.heartbeat(running, "host:1").cancel_requested is False
    asked = store.request_cancel(running)
    assert asked.state == TaskState.RUNNING and asked.cancel_requested
    beat = store.heartbeat(running, "host:1")
    assert beat.held and beat.cancel_requested
    assert store.cancelled(running, "host:1", "cancelled on request").state == TaskState.CANCELLED
    with pytest.raises(TaskConflict, match="already cancelled"):
        store.request_cancel(running)


def _age_heartbeat(store: TaskStore, task_id: str, seconds: float) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            update(tasks_table)
            .where(tasks_table.c.id == task_id)
            .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=seconds))
        )


def test_orphan_taken_over_then_given_up(store: TaskStore) -> None:
    task_id = _create(store)
    assert store.claim(task_id, "otherhost:1", ORPHAN_S, 2, None).outcome == ClaimOutcome.RUN
    duplicate = store.claim(task_id, "otherhost:2", ORPHAN_S, 2, None)
    assert duplicate.outcome == ClaimOutcome.DROP and "held by otherhost:1" in duplicate.reason
    _age_heartbeat(store, task_id, ORPHAN_S + 1)
    claim = store.claim(task_id, "otherhost:2", ORPHAN_S, 2, None)
    assert claim.outcome == ClaimOutcome.RUN and claim.task.attempts == 2
    assert not store.heartbeat(task_id, "otherhost:1").held, "the old holder lost it"
    _age_heartbeat(store, task_id, ORPHAN_S + 1)
    claim = store.claim(task_id, "otherhost:3", ORPHAN_S, 2, None)
    assert claim.outcome == ClaimOutcome.GAVE_UP and "gave up after 2 deliveries" in claim.reason
    assert store.fail(task_id, None, claim.reason).state == TaskState.FAILED


def test_a_recorded_publication_is_finished_past_the_delivery_cap(store: TaskStore) -> None:
    """Its version may already serve: the task is taken over to activate it, never failed as given up."""
    task_id = _create(store)
    assert store.claim(task_id, "otherhost:1", ORPHAN_S, 1, None).outcome == ClaimOutcome.RUN
    assert store.stage_version(task_id, "otherhost:1", "v2").held
    _age_heartbeat(store, task_id, ORPHAN_S + 1)
    requeued, exhausted = store.requeue_orphans(ORPHAN_S, 1)
    assert requeued == [task_id] and exhausted == {}
    takeover = store.claim(task_id, "otherhost:2", ORPHAN_S, 1, None)
    assert takeover.outcome == ClaimOutcome.RUN and takeover.task.attempts == 2
    assert store.staged_version(task_id) == "v2"


def test_dead_local_process_is_orphaned_at_once(store: TaskStore) -> None:
    """A holder on this host whose process is gone does not wait for the heartbeat timeout."""
    import socket
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    task_id = _create(store)
    dead = f"{socket.gethostname()}:{child.pid}"
    assert store.claim(task_id, dead, ORPHAN_S, 3, None).outcome == ClaimOutcome.RUN
    assert store.claim(task_id, worker_id(), ORPHAN_S, 3, None).outcome == ClaimOutcome.RUN


def test_unreaped_holder_is_dead() -> None:
    """A holder that exited but is not reaped yet (a zombie: SIGKILLed with its worker, waiting for init)
    is dead; a running one is alive."""
    import os
    import socket
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    holder = f"{socket.gethostname()}:{child.pid}"
    try:
        assert holder_alive(holder) is True
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # it exited; not reaped: a zombie
        assert Path(f"/proc/{child.pid}").exists() and holder_alive(holder) is False
    finally:
        child.kill()
        child.wait()


def test_holder_with_a_reused_pid_is_dead() -> None:
    """A restarted worker container keeps its hostname and may give its new pool process the old PID:
    the holder's start time tells the two apart; this process's own id is alive."""
    import os

    assert holder_alive(worker_id()) is True
    host, start, pid = worker_id().split(":")
    assert pid == str(os.getpid()) and start.isdigit()
    assert holder_alive(f"{host}:{int(start) - 1}:{pid}") is False  # same PID, an earlier process
    assert holder_alive(f"{host}:{pid}") is True  # rows written before the start time was recorded
    assert holder_alive(f"elsewhere-{host}:{start}:{pid}") is None


def test_requeue_orphans(store: TaskStore) -> None:
    retried, exhausted, alive = _create(store, "a"), _create(store, "b"), _create(store, "c")
    # the line allows one running task; put rows into the states directly as a crashed fleet leaves them
    with store.engine.begin() as conn:
        for task_id, attempts in ((retried, 1), (exhausted, 3), (alive, 1)):
            conn.execute(
                update(tasks_table)
                .where(tasks_table.c.id == task_id)
                .values(
                    state="running",
                    attempts=attempts,
                    worker=f"otherhost:{attempts}",
                    heartbeat_at=datetime.now(UTC),
                )
            )
    _age_heartbeat(store, retried, ORPHAN_S + 1)
    _age_heartbeat(store, exhausted, ORPHAN_S + 1)
    requeued, given_up = store.requeue_orphans(ORPHAN_S, 3)
    assert requeued == [retried] and list(given_up) == [exhausted] and "not retried" in given_up[exhausted]
    assert store.get(retried).state == TaskState.QUEUED and "died" in (store.get(retried).phase or "")
    assert store.get(exhausted).state == TaskState.RUNNING, "the caller fails it after deleting its data"
    assert store.get(alive).state == TaskState.RUNNING
    assert store.unfinished() == [retried, exhausted, alive]


def test_two_stores_share_the_table(database_url: str) -> None:
    """API and worker processes open their own stores on the same URL."""
    api, worker = TaskStore(database_url), TaskStore(database_url)
    try:
        task_id = api.create("ft", {}, ["x"], None).id
        assert worker.claim(task_id, "host:1", ORPHAN_S, 3, None).outcome == ClaimOutcome.RUN
        seen = api.get(task_id)  # the claim has committed: the other store sees it at once
        assert seen.state == TaskState.RUNNING and seen.started_at is not None
    finally:
        api.dispose()
        worker.dispose()


def test_open_read_does_not_block_a_progress_write(tmp_path: Path) -> None:
    """SQLite: an API read holding its transaction open (GET /tasks/{id}) and a worker's progress write.

    The read pauses inside its transaction until the write has returned (or a deadline passes): the
    write must land while the read is still open, and the read sees its snapshot from before the write.
    """
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    api, worker = TaskStore(url), TaskStore(url)
    reading, written = threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    try:
        task_id = api.create("ft", {}, ["x"], None).id
        assert worker.claim(task_id, "host:1", ORPHAN_S, 3, None).outcome == ClaimOutcome.RUN

        @event.listens_for(api.engine, "after_cursor_execute")
        def _pause_inside_the_read(conn, cursor, statement, *_) -> None:  # noqa: ANN001
            if threading.current_thread().name == "reader" and statement.startswith("SELECT"):
                reading.set()
                seen["written during the read"] = written.wait(timeout=10)

        def read() -> None:
            seen["epoch read"] = api.get(task_id).epoch

        reader = threading.Thread(target=read, name="reader")
        reader.start()
        assert reading.wait(timeout=10), "the read did not start"
        assert worker.progress(task_id, "host:1", "training", epoch=1) is True
        written.set()
        reader.join(timeout=30)
        assert seen == {"written during the read": True, "epoch read": None}
        assert api.get(task_id).epoch == 1
    finally:
        written.set()
        api.dispose()
        worker.dispose()


def test_progress_write_blocked_past_the_busy_timeout_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite: another process holds the write lock longer than the busy timeout; the step goes on."""
    path = tmp_path / "tasks.db"
    store = TaskStore(f"sqlite:///{path}", busy_timeout_s=0.2)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        task_id = store.create("ft", {}, ["x"], None).id
        assert store.claim(task_id, "host:1", ORPHAN_S, 3, None).outcome == ClaimOutcome.RUN
        blocker.execute("BEGIN IMMEDIATE")
        with caplog.at_level(logging.WARNING, logger="service.db"):
            assert store.progress(task_id, "host:1", "training", epoch=1) is True, "still held"
        assert f"progress of task {task_id} not recorded" in caplog.text
        blocker.execute("ROLLBACK")
        assert store.get(task_id).epoch is None
        assert store.progress(task_id, "host:1", "training", epoch=2) is True
        assert store.get(task_id).epoch == 2
    finally:
        blocker.close()
        store.dispose()
