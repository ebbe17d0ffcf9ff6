"""Service fixtures shared by every tests/service module.

Each test session gets a unique instance name (queue, Redis keys, pub/sub channel) and, for the task
table on PostgreSQL, its own database that is dropped afterwards, so concurrent sessions on the shared
Redis and PostgreSQL never see each other.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from service.archive import StagedDataset, receive_dataset
from service.db import FINISHED_STATES, TaskStore, TaskView
from service.registry import EXPORT_SUBDIR, MODEL_SUBDIR, Registry, VersionInfo
from service.settings import Settings
from tests.service.api_support import WorkerProcess
from training.data import write_synthetic_dataset

REDIS_URL = "redis://127.0.0.1:6379"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
TINY_STEP_OPTIONS = {
    "backbone": "resnet10",
    "context_channels": 16,
    "embed_channels": 16,
    "workers": 0,
    "min_iterations": 0,
}


@pytest.fixture(scope="session")
def redis_db() -> int:
    """A Redis database number for this session (1..15; isolation also comes from the instance name)."""
    return 1 + uuid.uuid4().int % 15


@pytest.fixture
def instance() -> str:
    """A unique instance name: queue ``INSTANCE.train`` and channel ``INSTANCE:active``."""
    return f"test-{uuid.uuid4().hex[:12]}"


def tiny_settings(data_dir: Path, instance: str, **overrides: object) -> Settings:
    """Embedded-mode settings (no Redis) in ``data_dir``, tiny training options, fast intervals."""
    values: dict = {
        "serve_size": 32,
        "ort_threads": 1,
        "default_epochs": 1,
        "default_size": 32,
        "default_batch_size": 2,
        "step_options": TINY_STEP_OPTIONS,
        "progress_interval_s": 0.2,
        "heartbeat_interval_s": 0.5,
        "orphan_timeout_s": 15.0,
    }
    return Settings(_env_file=None, data_dir=data_dir, instance=instance, **{**values, **overrides})


@pytest.fixture
def settings(tmp_path: Path, instance: str) -> Settings:
    """Embedded-mode settings (no Redis) under a temporary data directory, tiny training options."""
    return tiny_settings(tmp_path / "data", instance)


@pytest.fixture
def redis_settings(settings: Settings, redis_db: int) -> Settings:
    """The same settings with the real Redis as broker, result backend and announcement channel."""
    return settings.model_copy(update={"redis_url": f"{REDIS_URL}/{redis_db}"})


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database created for this session and dropped after it."""
    name = f"incseg_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The task table on SQLite (in tmp_path) and on the real PostgreSQL (tables emptied per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    url = request.getfixturevalue("postgres_url")
    store = TaskStore(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM incseg_tasks")
    store.dispose()
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[TaskStore]:
    """A task store on each database backend."""
    task_store = TaskStore(database_url)
    yield task_store
    task_store.dispose()


def publish_tiny_version(
    registry: Registry, classes: list[str], task_id: str | None = None, base_version: str | None = None
) -> VersionInfo:
    """Publishes a randomly initialised tiny BiSeNet (resnet10, 16 channels) exported at 32x32."""
    from export.onnx_export import export_onnx
    from tests.helpers import save_tiny_model

    with registry.staging() as stage:
        save_tiny_model(stage / MODEL_SUBDIR, classes, history=[{"step": 0, "classes_added": classes[1:]}])
        export_onnx(stage / MODEL_SUBDIR, stage / EXPORT_SUBDIR, (32, 32), parity_batches=(1,))
        return registry.publish(
            stage, metrics=None, task_id=task_id, base_version=base_version, engine="not built: test"
        )


@pytest.fixture
def registry(settings: Settings) -> Registry:
    """An empty registry in the settings' data directory."""
    return Registry(settings.registry_dir)


@pytest.fixture
def active_registry(registry: Registry) -> Registry:
    """The registry with one tiny published version (classes background, a, b), active."""
    registry.activate(publish_tiny_version(registry, ["background", "a", "b"]).name)
    return registry


def make_dataset_archive(
    out_dir: Path, num_classes: int, seed: int = 0, num_train: int = 8, num_val: int = 4, fmt: str = "zip"
) -> Path:
    """A zip or tar.gz of a synthetic dataset (32 px) in one top folder, as a user uploads it."""
    root = out_dir / f"dataset-{num_classes}-{seed}"
    write_synthetic_dataset(root / "data", num_classes, num_train, num_val, 32, seed)
    archive = shutil.make_archive(str(root), "zip" if fmt == "zip" else "gztar", root_dir=root)
    shutil.rmtree(root)
    return Path(archive)


def stage_dataset(settings: Settings, archive: Path, known: list[str] | None = None) -> StagedDataset:
    """Checks and extracts an archive into the settings' staging directory (as POST /tasks does)."""
    return receive_dataset(archive, archive.name, settings.staging_dir, settings, known or ["background"])


def wait_for(
    store: TaskStore, task_id: str, done: Callable[[TaskView], bool], timeout_s: float = 240
) -> TaskView:
    """Polls a task until ``done(task)`` holds; fails the test with the task's last state on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        task = store.get(task_id)
        if done(task):
            return task
        assert time.monotonic() < deadline, f"timed out waiting on task {task_id}: {task}"
        time.sleep(0.2)


def finished(task: TaskView) -> bool:
    return task.state in FINISHED_STATES


def image_files(root: Path) -> list[Path]:
    """Every image or mask file under ``root`` (what must not survive a finished task)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    """Starts worker subprocesses (ready to consume) and stops them all after the test."""
    workers: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()
