"""The task table: the service's source of truth (SQLAlchemy 2 Core; SQLite or PostgreSQL).

Celery's messages only wake a worker up; what a task is, where it stands and who runs it lives here. A
worker *claims* a task in one serialised transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``SELECT ...
FOR UPDATE`` on the single row of ``incseg_locks``), which is where the model line's ordering is enforced:
a queued task starts only when it is the oldest unfinished task and no other task holds the line (see
:meth:`TaskStore.claim`). A running task refreshes ``heartbeat_at``; one whose heartbeat is older than the
orphan timeout, or whose worker process is gone, is orphaned and taken over or failed.

Writes open ``engine.begin()``; reads go through :attr:`TaskStore.reader`, which on SQLite never blocks a
writer. Tables, upgrades and the engine's locking are in :mod:`service.db_schema`; who holds a running task
and whether it lives, in :mod:`service.holder`.

This module imports neither torch nor ``training`` (the API process uses it).
"""

from __future__ import annotations

import enum
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, overload

from pydantic import BaseModel, Field
from sqlalchemy import (
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import OperationalError

from service.db_schema import (
    DEFAULT_BUSY_TIMEOUT_S,
    DEFERRED_OPTION,
    LINE_LOCK,
    create_schema,
    locks_table,
    make_engine,
    tasks_table,
)
from service.holder import holder_alive

logger = logging.getLogger(__name__)


class TaskState(enum.StrEnum):
    """Life cycle of a task: queued -> running -> exporting -> done, or failed / cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATES = (TaskState.RUNNING, TaskState.EXPORTING)
FINISHED_STATES = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


class TaskView(BaseModel):
    """A task as the API shows it."""

    id: str
    state: TaskState
    method: str
    options: dict = Field(description="training options of the step (StepOptions fields)")
    classes: list[str] = Field(description="class names the task adds")
    supervision: Literal["full", "weak"] = Field(
        "full", description="weak: the training images have image-level labels (labels.csv), not masks"
    )
    base_version: str | None = Field(None, description="model version the step started from")
    phase: str | None = None
    epoch: int | None = None
    fraction: float = Field(0.0, description="progress of the current step in [0, 1]")
    loss: float | None = None
    metrics: dict | None = Field(
        None,
        description="validation metrics: old/new/all mIoU, per-class IoU; for a weak step also pseudo_labels "
        "(the pseudo-labels' statistics, the only figures when the val split has no masks)",
    )
    model_version: str | None = None
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(0, description="times a worker started the task")
    cancel_requested: bool = Field(
        False, description="DELETE was called; a running task stops at its next iteration or phase"
    )


class TaskNotFound(KeyError):
    """No task with this id."""


class TaskConflict(ValueError):
    """The task is in a state that does not allow the request (e.g. cancelling a finished task)."""


class ClaimOutcome(enum.StrEnum):
    """What a worker does with a delivered task message (see :meth:`TaskStore.claim`)."""

    RUN = "run"  # the worker now holds the task: run it
    WAIT = "wait"  # the line is busy or an older task goes first: deliver again later
    DROP = "drop"  # finished meanwhile, or running under a live holder (a duplicate message): forget it
    GAVE_UP = "gave_up"  # started max_deliveries times already: the caller deletes its data and fails it


@dataclass(frozen=True)
class Claim:
    """Result of a claim: the outcome, the task as it now stands, and why (for logs)."""

    outcome: ClaimOutcome
    task: TaskView
    reason: str


@dataclass(frozen=True)
class HoldStatus:
    """Answer to a heartbeat: whether the worker still holds the task and whether cancel was asked."""

    held: bool
    cancel_requested: bool


def _publishing_conflict(task_id: str, version: str, base_version: str | None) -> str:
    return (
        f"task {task_id} already published {version} and is activating it; it can no longer be cancelled: "
        f"once it is done, POST /models/{base_version or '<version>'}/activate to go back"
    )


@overload
def _utc(value: datetime) -> datetime: ...
@overload
def _utc(value: None) -> None: ...
def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _view(row: RowMapping) -> TaskView:
    return TaskView(
        id=row["id"],
        state=TaskState(row["state"]),
        method=row["method"],
        options=row["options"],
        classes=row["classes"],
        supervision=row["supervision"] or "full",
        base_version=row["base_version"],
        phase=row["phase"],
        epoch=row["epoch"],
        fraction=row["fraction"],
        loss=row["loss"],
        metrics=row["metrics"],
        model_version=row["model_version"],
        error=row["error"],
        created_at=_utc(row["created_at"]),
        started_at=_utc(row["started_at"]),
        finished_at=_utc(row["finished_at"]),
        attempts=row["attempts"],
        cancel_requested=row["cancel_requested"],
    )


class TaskStore:
    """The task table behind a SQLAlchemy URL (schema created or upgraded on first use).

    Writes open ``engine.begin()``; reads open ``reader.connect()`` (on SQLite, a deferred transaction
    that does not take the write lock).

    Args:
        database_url: e.g. ``sqlite:////data/tasks.db`` or ``postgresql+psycopg://user@host/db``.
        busy_timeout_s: SQLite: how long a write waits for the write lock before it fails.
    """

    def __init__(self, database_url: str, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.database_url = database_url
        self.engine = make_engine(database_url, busy_timeout_s)
        self.reader = self.engine.execution_options(**{DEFERRED_OPTION: True})
        create_schema(self.engine)

    def dispose(self) -> None:
        """Closes the pooled connections."""
        self.engine.dispose()

    # ---- API side -------------------------------------------------------------------------------------

    def create(
        self,
        method: str,
        options: dict,
        classes: list[str],
        dataset_dir: Path | None,
        supervision: Literal["full", "weak"] = "full",
    ) -> TaskView:
        """Adds a queued task and returns it (``supervision``: of its dataset's training images)."""
        task_id = uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(
                insert(tasks_table).values(
                    id=task_id,
                    state=TaskState.QUEUED.value,
                    method=method,
                    options=dict(options),
                    classes=list(classes),
                    supervision=supervision,
                    dataset_dir=str(dataset_dir) if dataset_dir is not None else None,
                    phase="queued",
                    fraction=0.0,
                    created_at=_now(),
                    attempts=0,
                    cancel_requested=False,
                )
            )
            return _view(self._row(conn, task_id))

    def get(self, task_id: str) -> TaskView:
        """The task ``task_id``.

        Raises:
            TaskNotFound: No such task.
        """
        with self.reader.connect() as conn:
            return _view(self._row(conn, task_id))

    def page(self, offset: int = 0, limit: int = 20) -> tuple[list[TaskView], int]:
        """A page of tasks, newest first, and the total count."""
        with self.reader.connect() as conn:
            rows = conn.execute(
                select(tasks_table).order_by(tasks_table.c.seq.desc()).offset(offset).limit(limit)
            ).mappings()
            views = [_view(row) for row in rows]
            total = conn.execute(select(func.count()).select_from(tasks_table)).scalar_one()
        return views, int(total)

    def counts(self) -> dict[TaskState, int]:
        """Number of tasks in each state (every state present, zeros included)."""
        with self.reader.connect() as conn:
            rows = conn.execute(select(tasks_table.c.state, func.count()).group_by(tasks_table.c.state)).all()
        found = {TaskState(state): int(count) for state, count in rows}
        return {state: found.get(state, 0) for state in TaskState}

    def dataset_dir(self, task_id: str) -> Path | None:
        """The staged dataset of a task (None once removed or when there was none)."""
        with self.reader.connect() as conn:
            value = self._row(conn, task_id)["dataset_dir"]
        return Path(value) if value else None

    def request_cancel(self, task_id: str) -> TaskView:
        """Cancels a queued task at once; asks a running one to stop (its worker marks it cancelled).

        Raises:
            TaskNotFound: No such task.
            TaskConflict: The task already finished.
        """
        with self.engine.begin() as conn:
            row = self._row(conn, task_id)
            state = TaskState(row["state"])
            if state in FINISHED_STATES:
                raise TaskConflict(
                    f"task {task_id} is already {state.value}; only queued or running tasks can be cancelled"
                )
            if row["staged_version"] is not None:
                raise TaskConflict(_publishing_conflict(task_id, row["staged_version"], row["base_version"]))
            values: dict[str, Any] = {"cancel_requested": True}
            if state == TaskState.QUEUED:
                values |= {
                    "state": TaskState.CANCELLED.value,
                    "phase": "cancelled",
                    "finished_at": _now(),
                    "error": "cancelled before it started",
                }
            conn.execute(
                update(tasks_table)
                .where(tasks_table.c.id == task_id, tasks_table.c.staged_version.is_(None))
                .values(**values)
            )
            row = self._row(conn, task_id)
            if row["staged_version"] is not None:  # its worker recorded the version in the meantime
                raise TaskConflict(_publishing_conflict(task_id, row["staged_version"], row["base_version"]))
            return _view(row)

    # ---- worker side ----------------------------------------------------------------------------------

    def claim(
        self,
        task_id: str,
        worker: str,
        orphan_timeout_s: float,
        max_deliveries: int,
        base_version: str | None,
    ) -> Claim:
        """Decides, in one serialised transaction, whether ``worker`` runs a delivered task now.

        The model line is a lock held by the running task: a queued task starts only when no task
        older than it (in the order posted) is unfinished and no other task is running or exporting
        (else WAIT). A message for a finished task, or for a running one whose holder lives, is a
        duplicate (DROP). A running task whose holder died (its process gone, on the holder's host; its
        heartbeat older than ``orphan_timeout_s``, elsewhere) is taken over. Each start counts one
        attempt; past ``max_deliveries`` the outcome is GAVE_UP.

        Args:
            task_id: The delivered task.
            worker: Identity of the claiming process (:func:`worker_id`).
            orphan_timeout_s: Heartbeat age after which a holder counts as dead.
            max_deliveries: Most starts of one task; past it the outcome is GAVE_UP with the error message
                as ``reason``, and the caller deletes the task's data, then fails it (:meth:`fail`).
            base_version: The active model version now (recorded as the step's base).

        Raises:
            TaskNotFound: No such task.
        """
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(select(locks_table).where(locks_table.c.name == LINE_LOCK).with_for_update()).first()
            row = self._row(conn, task_id)
            state = TaskState(row["state"])
            if state in FINISHED_STATES:
                return Claim(ClaimOutcome.DROP, _view(row), f"already {state.value}")
            if state in ACTIVE_STATES and not self._orphaned(row, now, orphan_timeout_s):
                # a duplicate message: the holder finishes the task, and should it die, its message is
                # requeued (reject on worker lost) or the orphan sweep sends a new one
                return Claim(ClaimOutcome.DROP, _view(row), f"held by {row['worker']}")
            if state == TaskState.QUEUED:
                blocker = (
                    conn.execute(
                        select(
                            tasks_table.c.id,
                            tasks_table.c.state,
                            tasks_table.c.heartbeat_at,
                            tasks_table.c.worker,
                        )
                        .where(
                            tasks_table.c.id != task_id,
                            (tasks_table.c.seq < row["seq"])
                            | tasks_table.c.state.in_([s.value for s in ACTIVE_STATES]),
                            tasks_table.c.state.not_in([s.value for s in FINISHED_STATES]),
                        )
                        .order_by(tasks_table.c.seq)
                        .limit(1)
                    )
                    .mappings()
                    .first()
                )
                if blocker is not None:
                    return Claim(
                        ClaimOutcome.WAIT, _view(row), f"after task {blocker['id']} ({blocker['state']})"
                    )
            attempts = row["attempts"] + 1
            # a task whose version is published and recorded only needs activating: never given up on
            if attempts > max_deliveries and row["staged_version"] is None:
                message = (
                    f"gave up after {row['attempts']} deliveries: the worker running the task died each "
                    f"time (killed, out of memory or time limit); last holder {row['worker']}"
                )
                return Claim(ClaimOutcome.GAVE_UP, _view(row), message)
            conn.execute(
                update(tasks_table)
                .where(tasks_table.c.id == task_id)
                .values(
                    state=TaskState.RUNNING.value,
                    phase="preparing",
                    epoch=None,
                    fraction=0.0,
                    loss=None,
                    base_version=base_version,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=attempts,
                    worker=worker,
                )
            )
            reason = (
                "first delivery" if attempts == 1 else f"attempt {attempts} (previous holder {row['worker']})"
            )
            return Claim(ClaimOutcome.RUN, _view(self._row(conn, task_id)), reason)

    def heartbeat(self, task_id: str, worker: str) -> HoldStatus:
        """Refreshes the heartbeat of a task ``worker`` holds; tells whether it still holds it."""
        with self.engine.begin() as conn:
            held = self._held(task_id, worker)
            result = conn.execute(update(tasks_table).where(*held).values(heartbeat_at=_now()))
            if result.rowcount == 0:
                return HoldStatus(False, False)
            return HoldStatus(True, bool(self._row(conn, task_id)["cancel_requested"]))

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
        """Records progress (and refreshes the heartbeat) of a held task; False when no longer held.

        A write that cannot get the database (SQLite's write lock held past the busy timeout, PostgreSQL
        unreachable) is logged and skipped: the step goes on, and True ("still held") is returned; the
        next progress write or heartbeat tells whether the task is still held.
        """
        values: dict[str, Any] = {"phase": phase, "heartbeat_at": _now()}
        if epoch is not None:
            values["epoch"] = epoch
        if fraction is not None:
            values["fraction"] = float(fraction)
        if loss is not None:
            values["loss"] = float(loss)
        if state is not None:
            values["state"] = state.value
        try:
            with self.engine.begin() as conn:
                return (
                    conn.execute(
                        update(tasks_table).where(*self._held(task_id, worker)).values(**values)
                    ).rowcount
                    > 0
                )
        except OperationalError as err:
            logger.warning("progress of task %s not recorded, the step goes on: %s", task_id, err.orig)
            return True

    def finish(self, task_id: str, worker: str, model_version: str, metrics: dict | None) -> TaskView:
        """Marks a held task done with its new model version and metrics."""
        return self._end(
            task_id,
            worker,
            TaskState.DONE,
            model_version=model_version,
            metrics=metrics,
            fraction=1.0,
            error=None,
        )

    def fail(self, task_id: str, worker: str | None, error: str, **values: Any) -> TaskView:
        """Marks a task failed with ``error`` (``worker=None``: whoever holds it)."""
        return self._end(task_id, worker, TaskState.FAILED, error=error, **values)

    def cancelled(self, task_id: str, worker: str | None, reason: str) -> TaskView:
        """Marks a task cancelled (its worker stopped it on request)."""
        return self._end(task_id, worker, TaskState.CANCELLED, error=reason)

    def record_message(self, task_id: str) -> None:
        """Notes that a message of the task was sent or delivered just now (see :meth:`unsent_queued`)."""
        with self.engine.begin() as conn:
            conn.execute(update(tasks_table).where(tasks_table.c.id == task_id).values(message_at=_now()))

    def unsent_queued(self, older_than_s: float) -> list[str]:
        """Queued tasks whose message was last sent or delivered more than ``older_than_s`` ago.

        Their message is taken for lost (the sender died before sending it, the broker lost it, or a dead
        worker holds it until the visibility timeout) and the caller sends a new one. None while a task
        runs: a queued task's message may then wait in the broker, undelivered, for as long as the step
        takes; once the line is free, a message still not delivered is stale at once.

        Returns:
            Their ids in the order posted.
        """
        cutoff = _now() - timedelta(seconds=older_than_s)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    tasks_table.c.id, tasks_table.c.state, tasks_table.c.message_at, tasks_table.c.created_at
                )
                .where(tasks_table.c.state.not_in([s.value for s in FINISHED_STATES]))
                .order_by(tasks_table.c.seq)
            ).all()
        if any(TaskState(state) in ACTIVE_STATES for _, state, _, _ in rows):
            return []
        return [task_id for task_id, _, sent, created in rows if _utc(sent or created) < cutoff]

    def stage_version(self, task_id: str, worker: str, version: str) -> HoldStatus:
        """Records the version a held task published, unless cancellation was requested first.

        From then on the task can no longer be cancelled (:meth:`request_cancel` answers a conflict), and
        a worker taking the task over finishes its publication instead of training again.

        Returns:
            Whether ``worker`` still holds the task and whether cancellation was requested; the version was
            recorded when it holds the task and no cancellation was requested.
        """
        with self.engine.begin() as conn:
            recorded = conn.execute(
                update(tasks_table)
                .where(*self._held(task_id, worker), tasks_table.c.cancel_requested.is_(False))
                .values(staged_version=version, heartbeat_at=_now())
            ).rowcount
            if recorded:
                return HoldStatus(True, False)
            row = self._row(conn, task_id)
            held = row["worker"] == worker and TaskState(row["state"]) in ACTIVE_STATES
            return HoldStatus(held, bool(row["cancel_requested"]))

    def staged_version(self, task_id: str) -> str | None:
        """The version the task published (recorded by :meth:`stage_version`), or None."""
        with self.engine.connect() as conn:
            return self._row(conn, task_id)["staged_version"]

    def clear_dataset(self, task_id: str) -> None:
        """Forgets the staged dataset's path once it was deleted."""
        with self.engine.begin() as conn:
            conn.execute(update(tasks_table).where(tasks_table.c.id == task_id).values(dataset_dir=None))

    def requeue_orphans(
        self, orphan_timeout_s: float, max_deliveries: int
    ) -> tuple[list[str], dict[str, str]]:
        """Requeues running tasks whose worker died; lists those already delivered too often.

        Returns:
            Ids requeued (the caller sends them a new message), and id -> error message of the exhausted
            ones (the caller deletes their data, then fails them with :meth:`fail`).
        """
        now = _now()
        requeued, exhausted = [], {}
        with self.engine.begin() as conn:
            conn.execute(select(locks_table).where(locks_table.c.name == LINE_LOCK).with_for_update()).first()
            rows = (
                conn.execute(
                    select(tasks_table).where(tasks_table.c.state.in_([s.value for s in ACTIVE_STATES]))
                )
                .mappings()
                .all()
            )
            for row in rows:
                if not self._orphaned(row, now, orphan_timeout_s):
                    continue
                where = tasks_table.c.id == row["id"]
                if row["attempts"] >= max_deliveries and row["staged_version"] is None:
                    exhausted[row["id"]] = (
                        f"the worker running the task ({row['worker']}) died during attempt "
                        f"{row['attempts']} of {max_deliveries}; not retried"
                    )
                else:
                    conn.execute(
                        update(tasks_table)
                        .where(where)
                        .values(
                            state=TaskState.QUEUED.value,
                            phase=f"requeued: worker {row['worker']} died during attempt {row['attempts']}",
                        )
                    )
                    requeued.append(row["id"])
        return requeued, exhausted

    def unfinished(self) -> list[str]:
        """Ids of queued, running and exporting tasks in the order posted."""
        with self.reader.connect() as conn:
            rows = conn.execute(
                select(tasks_table.c.id)
                .where(tasks_table.c.state.not_in([s.value for s in FINISHED_STATES]))
                .order_by(tasks_table.c.seq)
            ).all()
        return [row[0] for row in rows]

    def unfinished_datasets(self) -> list[Path]:
        """Staged dataset folders of queued, running and exporting tasks."""
        with self.reader.connect() as conn:
            rows = conn.execute(
                select(tasks_table.c.dataset_dir).where(
                    tasks_table.c.state.not_in([s.value for s in FINISHED_STATES]),
                    tasks_table.c.dataset_dir.is_not(None),
                )
            ).all()
        return [Path(row[0]) for row in rows]

    # ---- helpers --------------------------------------------------------------------------------------

    @staticmethod
    def _row(conn: Connection, task_id: str) -> RowMapping:
        row = conn.execute(select(tasks_table).where(tasks_table.c.id == task_id)).mappings().first()
        if row is None:
            raise TaskNotFound(task_id)
        return row

    @staticmethod
    def _held(task_id: str, worker: str) -> tuple:
        return (
            tasks_table.c.id == task_id,
            tasks_table.c.worker == worker,
            tasks_table.c.state.in_([s.value for s in ACTIVE_STATES]),
        )

    @staticmethod
    def _orphaned(row: RowMapping, now: datetime, orphan_timeout_s: float) -> bool:
        """A running task whose holder is gone: its process is dead (known on the holder's host), or,
        for a holder on another host, its heartbeat is older than ``orphan_timeout_s``.

        A live local holder is never orphaned, however late its heartbeat (a loaded machine can starve
        the heartbeat thread); a hung one is ended by the hard time limit, which kills its process.
        """
        alive = holder_alive(row["worker"])
        if alive is not None:
            return not alive
        beat = _utc(row["heartbeat_at"])
        return beat is None or now - beat > timedelta(seconds=orphan_timeout_s)

    def _end(self, task_id: str, worker: str | None, state: TaskState, **values: Any) -> TaskView:
        with self.engine.begin() as conn:
            condition = (
                self._held(task_id, worker)
                if worker is not None
                else (
                    tasks_table.c.id == task_id,
                    tasks_table.c.state.not_in([s.value for s in FINISHED_STATES]),
                )
            )
            conn.execute(
                update(tasks_table)
                .where(*condition)
                .values(state=state.value, phase=state.value, finished_at=_now(), **values)
            )
            return _view(self._row(conn, task_id))
