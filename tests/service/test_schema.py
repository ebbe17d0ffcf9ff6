"""The task table's schema: created once by concurrent first starts, upgraded in place from older versions."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    func,
    insert,
    inspect,
    select,
)

from service.db import TaskState, TaskStore
from service.db_schema import LINE_LOCK, SCHEMA_VERSION, locks_table, schema_table, schema_version
from tests.service.conftest import POSTGRES_ADMIN_URL

OLD_TASK = "0" * 32
STARTS = 12
UPGRADE_STARTS = 4
ROUNDS = 2  # the old create_all crashed in 0 to 5 of 12 starts per round on PostgreSQL
# Each child imports the store, says "ready", waits for the go line on stdin, then opens the store: the
# twelve first starts hit the empty database together, as compose starting the API and the workers does.
FIRST_START = """
import sys
from service.db import TaskStore
print("ready", flush=True)
sys.stdin.readline()
TaskStore(sys.argv[1]).dispose()
"""


@contextmanager
def _fresh_database(backend: str, directory: Path) -> Iterator[str]:
    """An empty task database (SQLite in ``directory``, or a new PostgreSQL database dropped after use)."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / f'tasks-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"incseg_schema_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _first_starts(url: str, count: int) -> list[subprocess.CompletedProcess]:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_START, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for child in children:
        assert child.stdout is not None and child.stderr is not None  # both piped
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
    for child in children:
        assert child.stdin is not None  # piped
        child.stdin.write("go\n")
        child.stdin.flush()
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr))
    return results


def _assert_no_crash(results: list[subprocess.CompletedProcess]) -> None:
    crashed = [r for r in results if r.returncode != 0]
    assert not crashed, f"{len(crashed)} of {len(results)} starts crashed:\n{crashed[0].stderr[-3000:]}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_first_starts_create_the_schema_once(backend: str, tmp_path: Path) -> None:
    """Twelve processes opening the store on an empty database at once: none crashes, one current schema."""
    for _ in range(ROUNDS):
        with _fresh_database(backend, tmp_path) as url:
            _assert_no_crash(_first_starts(url, STARTS))
            store = TaskStore(url)
            try:
                assert schema_version(store.engine) == SCHEMA_VERSION
                with store.engine.connect() as conn:
                    assert conn.execute(select(func.count()).select_from(schema_table)).scalar_one() == 1
                    assert conn.execute(select(func.count()).select_from(locks_table)).scalar_one() == 1
                task_id = store.create("ft", {}, ["x"], None).id
                assert store.get(task_id).state == TaskState.QUEUED
            finally:
                store.dispose()


def _old_schema(url: str) -> None:
    """The tables as the service made them before the schema was versioned, with one finished task."""
    old = MetaData()
    tasks = Table(
        "incseg_tasks",
        old,
        Column("seq", Integer, primary_key=True, autoincrement=True),
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
    )
    locks = Table("incseg_locks", old, Column("name", String(64), primary_key=True))
    engine = create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(locks).values(name=LINE_LOCK))
        conn.execute(
            insert(tasks).values(
                id=OLD_TASK,
                state="done",
                method="mib",
                options={"epochs": 3},
                classes=["cat"],
                model_version="v1",
                created_at=datetime.now(UTC),
                attempts=1,
                cancel_requested=False,
            )
        )
    engine.dispose()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_old_schema_upgraded_in_place_by_concurrent_starts(backend: str, tmp_path: Path) -> None:
    """A database made before versioning gets the new columns once; its tasks are kept."""
    with _fresh_database(backend, tmp_path) as url:
        _old_schema(url)
        engine = create_engine(url)
        assert schema_version(engine) == 1
        engine.dispose()
        _assert_no_crash(_first_starts(url, UPGRADE_STARTS))
        store = TaskStore(url)
        try:
            assert schema_version(store.engine) == SCHEMA_VERSION
            columns = {column["name"] for column in inspect(store.engine).get_columns("incseg_tasks")}
            assert {"message_at", "staged_version"} <= columns
            kept = store.get(OLD_TASK)
            assert (kept.state, kept.classes, kept.model_version) == (TaskState.DONE, ["cat"], "v1")
            task_id = store.create("ft", {}, ["x"], None).id
            assert store.claim(task_id, "host:1", 30.0, 3, "v1").task.state == TaskState.RUNNING
        finally:
            store.dispose()
