"""The task table: the service's source of truth (SQLAlchemy 2 Core; SQLite or PostgreSQL).

Celery's messages only wake a worker up; what a task is, where it stands and who runs it lives here. A
worker *claims* a task in one serialised transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``SELECT ...
FOR UPDATE`` on the single row of ``incseg_locks``), which is where the model line's ordering is enforced:
a queued task starts only when it is the oldest unfinished task and no other task holds the line (see
:meth:`TaskStore.claim`). A running task refreshes ``heartbeat_at``; one whose heartbeat is older than the
orphan timeout, or whose worker process is gone, is orphaned and taken over or failed.

On SQLite (in WAL mode) only writes take the write lock: a transaction opened by ``engine.begin()`` starts
with ``BEGIN IMMEDIATE``, a read through :attr:`TaskStore.reader` with a deferred ``BEGIN``, which never
blocks a writer. The schema is versioned (:func:`create_schema`): the first process to open an empty or
older database creates or upgrades it while it holds the database's schema lock, the others wait and
find it current.

This module imports neither torch nor ``training`` (the API process uses it).
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import OperationalError

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
LINE_LOCK = "model_line"

metadata = MetaData()
tasks_table = Table(
    "incseg_tasks",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # order posted
    Column("id", String(32), nullable=False, unique=True),
    Column("state", String(16), nullable=False, index=True),
    Column("method", String(200), nullable=False),
    Column("options", JSON, nullable=False),
    Column("classes", JSON, nullable=False),
    Column("dataset_dir", Text, nullable=True),
    Column("base_version", String(32), nullable=True),
    Column("phase", String(64), nullable=True),
    Column("epoch", Integer, nullable=True),
    Column("fraction", Float, nullable=False, default=0.0),
    Column("loss", Float, nullable=True),
    Column("metrics", JSON, nullable=True),
    Column("model_version", String(32), nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("heartbeat_at", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("worker", String(200), nullable=True),
    Column("message_at", DateTime(timezone=True), nullable=True),  # last send or delivery of its message
    Column("staged_version", String(32), nullable=True),  # version the task published, before it is done
)
locks_table = Table("incseg_locks", metadata, Column("name", String(64), primary_key=True))
schema_table = Table("incseg_schema", metadata, Column("version", Integer, nullable=False))

DEFERRED_OPTION = "incseg_deferred"  # execution option of TaskStore.reader: SQLite reads begin deferred
SCHEMA_LOCK_KEY = 0x1AC5E6  # PostgreSQL advisory lock held while the schema is created or upgraded
DEFAULT_BUSY_TIMEOUT_S = 30.0


def _add_task_columns(conn: Connection, *names: str) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for columns of :data:`tasks_table` (nullable, no default) it lacks."""
    present = {column["name"] for column in inspect(conn).get_columns(tasks_table.name)}
    for name in (name for name in names if name not in present):
        column_type = tasks_table.c[name].type.compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE {tasks_table.name} ADD COLUMN {name} {column_type}"))


def _upgrade_to_2(conn: Connection) -> None:
    """Version 2: the message outbox's ``message_at`` and the publishing step's ``staged_version``."""
    _add_task_columns(conn, "message_at", "staged_version")


# UPGRADES[v - 1] upgrades a version-v database to v + 1. Version 1 is the schema of databases made before
# the schema was versioned (no incseg_schema table); a new database is created at SCHEMA_VERSION.
UPGRADES: tuple[Callable[[Connection], None], ...] = (_upgrade_to_2,)
SCHEMA_VERSION = 1 + len(UPGRADES)


class TaskView(BaseModel):
    """A task as the API shows it."""

    id: str
    state: TaskState
    method: str
    options: dict = Field(description="training options of the step (StepOptions fields)")
    classes: list[str] = Field(description="class names the task adds")
    base_version: str | None = Field(None, description="model version the step started from")
    phase: str | None = None
    epoch: int | None = None
    fraction: float = Field(0.0, description="progress of the current step in [0, 1]")
    loss: float | None = None
    metrics: dict | None = Field(None, description="validation metrics: old/new/all mIoU, per-class IoU")
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


def worker_id() -> str:
    """Identity of this process as a task holder: ``host:start:pid``.

    ``start`` is the process's start time (``/proc``, clock ticks since boot; empty where there is no
    ``/proc``): a worker container restarted with the same hostname gets a fresh PID namespace, and its
    new pool process often has the PID of the old one, which a bare ``host:pid`` would take as alive.
    Ticks since boot are immune to clock changes; a wall-clock start time (``psutil.Process.create_time``,
    boot time plus ticks) moves when NTP sets the clock (a Jetson without a real-time clock at boot), and
    a live holder would then read as dead.
    """
    return f"{socket.gethostname()}:{_start_time(os.getpid()) or ''}:{os.getpid()}"


def holder_alive(holder: str | None) -> bool | None:
    """Whether the process named ``host:start:pid`` (or ``host:pid``) is alive: known only on its host.

    None on another host. A process with that PID but another start time is a different process (the
    PID was reused): the holder is dead. A zombie (exited, not yet reaped: a pool process whose worker was
    SIGKILLed with it waits for init to reap it, which can take seconds on a loaded machine) is dead.
    """
    if not holder or ":" not in holder:
        return None
    rest, _, pid = holder.rpartition(":")
    host, sep, start = rest.rpartition(":")
    if not sep:
        host, start = rest, ""
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start and _start_time(int(pid)) not in (None, start):
        return False
    return not _exited(int(pid))


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` from the state on (field 3), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()  # the command name in parentheses may hold spaces


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/PID/stat``), or None."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _exited(pid: int) -> bool:
    """Whether ``/proc`` shows the process as a zombie or dead (False where there is no ``/proc``)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] in ("Z", "X")


def _publishing_conflict(task_id: str, version: str, base_version: str | None) -> str:
    return (
        f"task {task_id} already published {version} and is activating it; it can no longer be cancelled: "
        f"once it is done, POST /models/{base_version or '<version>'}/activate to go back"
    )


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


def _make_engine(database_url: str, busy_timeout_s: float) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` for every transaction but reads.

    SQLite's deferred transactions let two claimers read "line free" and then both write; ``BEGIN
    IMMEDIATE`` takes the write lock at the start, which makes every writing transaction serialisable. A
    connection with the :data:`DEFERRED_OPTION` execution option (:attr:`TaskStore.reader`) begins
    deferred: in WAL mode it reads a snapshot and never waits for, nor blocks, a writer.
    """
    if not database_url.startswith("sqlite"):
        return create_engine(database_url, pool_pre_ping=True)
    path = database_url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver issues no BEGIN; the event below does
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")  # before WAL: it may wait
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        deferred = connection.get_execution_options().get(DEFERRED_OPTION, False)
        connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine


def schema_version(engine: Engine) -> int | None:
    """The schema version of the engine's database (None: no task table yet; 1: made before versioning)."""
    with engine.connect() as conn:
        return _stored_version(conn)


def _stored_version(conn: Connection) -> int | None:
    inspector = inspect(conn)
    if not inspector.has_table(tasks_table.name):
        return None
    if not inspector.has_table(schema_table.name):
        return 1
    return conn.execute(select(func.max(schema_table.c.version))).scalar_one_or_none() or 1


def create_schema(engine: Engine) -> None:
    """Creates the tables, or upgrades an older database in place, under the database's schema lock.

    The lock is PostgreSQL's transaction-level advisory lock :data:`SCHEMA_LOCK_KEY`, SQLite's write lock
    (``BEGIN IMMEDIATE``); DDL is transactional on both, so a process that dies half way leaves the old
    schema. Processes starting together (the API and the workers) wait for the first one and then find
    the schema current.

    Raises:
        RuntimeError: The database was made by a newer version of the service.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
        version = _stored_version(conn)
        if version is None:
            metadata.create_all(conn)
            conn.execute(insert(schema_table).values(version=SCHEMA_VERSION))
            conn.execute(insert(locks_table).values(name=LINE_LOCK))
            return
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the task database has schema version {version}, newer than this service's "
                f"{SCHEMA_VERSION}: run the newer service version (or a fresh database)"
            )
        if version == SCHEMA_VERSION:
            return
        for upgrade in UPGRADES[version - 1 :]:
            upgrade(conn)
        metadata.create_all(conn)  # the version table, on a database made before versioning
        conn.execute(schema_table.delete())
        conn.execute(insert(schema_table).values(version=SCHEMA_VERSION))
        if conn.execute(select(locks_table).where(locks_table.c.name == LINE_LOCK)).first() is None:
            conn.execute(insert(locks_table).values(name=LINE_LOCK))
        logger.warning("task database upgraded from schema version %d to %d", version, SCHEMA_VERSION)


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
        self.engine = _make_engine(database_url, busy_timeout_s)
        self.reader = self.engine.execution_options(**{DEFERRED_OPTION: True})
        create_schema(self.engine)

    def dispose(self) -> None:
        """Closes the pooled connections."""
        self.engine.dispose()

    # ---- API side -------------------------------------------------------------------------------------

    def create(self, method: str, options: dict, classes: list[str], dataset_dir: Path | None) -> TaskView:
        """Adds a queued task and returns it."""
        task_id = uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(
                insert(tasks_table).values(
                    id=task_id,
                    state=TaskState.QUEUED.value,
                    method=method,
                    options=dict(options),
                    classes=list(classes),
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
            if attempts > max_deliveries:
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
                if row["attempts"] >= max_deliveries:
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
