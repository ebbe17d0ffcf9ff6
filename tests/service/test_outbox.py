"""The task table's outbox and publication records on SQLite and PostgreSQL: which queued tasks count as
unsent, and when a cancellation is still honoured."""

from __future__ import annotations

import pytest

from service.db import TaskConflict, TaskState, TaskStore

WORKER = "host:1:1"


def test_unsent_queued_tasks_are_those_without_a_recent_message(store: TaskStore) -> None:
    never_sent = store.create("mib", {}, ["a"], None)
    sent = store.create("mib", {}, ["b"], None)
    store.record_message(sent.id)
    assert store.unsent_queued(older_than_s=3600) == []
    assert store.unsent_queued(older_than_s=-1) == [never_sent.id, sent.id]
    # while a step runs, a queued task's message may wait undelivered: nothing counts as unsent
    store.claim(never_sent.id, WORKER, 60, 3, None)
    assert store.unsent_queued(older_than_s=-1) == []
    store.finish(never_sent.id, WORKER, "v1", None)
    assert store.unsent_queued(older_than_s=-1) == [sent.id]


def test_a_recorded_version_ends_cancellation(store: TaskStore) -> None:
    task = store.create("mib", {}, ["a"], None)
    store.claim(task.id, WORKER, 60, 3, None)
    staged = store.stage_version(task.id, WORKER, "v1")
    assert (staged.held, staged.cancel_requested) == (True, False)
    assert store.staged_version(task.id) == "v1"
    with pytest.raises(TaskConflict, match="already published v1"):
        store.request_cancel(task.id)
    assert not store.get(task.id).cancel_requested
    assert not store.stage_version(task.id, "host:2:2", "v1").held, "only the holder records"


def test_a_cancellation_before_the_record_wins(store: TaskStore) -> None:
    task = store.create("mib", {}, ["a"], None)
    store.claim(task.id, WORKER, 60, 3, None)
    assert store.request_cancel(task.id).state == TaskState.RUNNING
    staged = store.stage_version(task.id, WORKER, "v1")
    assert (staged.held, staged.cancel_requested) == (True, True)
    assert store.staged_version(task.id) is None
