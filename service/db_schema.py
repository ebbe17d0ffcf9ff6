"""The task table's schema and engine: tables, versioned upgrades, SQLite's locking, created once.

The schema is versioned: the first process to open an empty or older database creates or upgrades it
while it holds the database's schema lock (PostgreSQL advisory lock, SQLite write lock), the others wait
and find it current (:func:`create_schema`). On SQLite (in WAL mode) only writes take the write lock: a
transaction opened by ``engine.begin()`` starts with ``BEGIN IMMEDIATE``, one whose connection carries
:data:`DEFERRED_OPTION` with a deferred ``BEGIN``, which never blocks a writer.

The store itself is :class:`service.db.TaskStore`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
)
from sqlalchemy.engine import Connection

logger = logging.getLogger(__name__)

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
    Column("supervision", String(8), nullable=True),  # "full" | "weak"; NULL (older rows) reads "full"
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


def _upgrade_to_3(conn: Connection) -> None:
    """Version 3: the task's ``supervision`` (weak labels); older tasks read as full supervision."""
    _add_task_columns(conn, "supervision")


# UPGRADES[v - 1] upgrades a version-v database to v + 1. Version 1 is the schema of databases made before
# the schema was versioned (no incseg_schema table); a new database is created at SCHEMA_VERSION.
UPGRADES: tuple[Callable[[Connection], None], ...] = (_upgrade_to_2, _upgrade_to_3)
SCHEMA_VERSION = 1 + len(UPGRADES)


def make_engine(database_url: str, busy_timeout_s: float) -> Engine:
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
