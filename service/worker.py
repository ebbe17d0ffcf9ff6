"""The worker process: its task store and registry, start-up recovery, the sweep, ``incseg worker``'s argv.

Recovery (a task never stays "running" after its worker died, and never stays "queued" without a message):

* On start (Celery's ``worker_ready``), a worker requeues orphaned tasks (running, and their holder's
  process gone or their heartbeat older than ``orphan_timeout_s``) or fails those already started
  ``max_deliveries`` times, deletes the staged data of the failed ones and the uploads no task owns
  (``service.staging``), removes staging directories a crashed worker left in the registry, and sends a
  fresh message for every queued task (the embedded broker loses a fetched message with its worker; with
  Redis, an unacknowledged message would otherwise wait for the visibility timeout). Duplicate messages
  are harmless: claims drop them.
* While it runs, a thread repeats the sweep every half of the smaller of ``orphan_timeout_s`` and
  ``resend_after_s``: orphans are requeued by any live worker, and the task table works as an outbox:
  every send and every delivery of a task's message is recorded (``message_at``), and a queued task whose
  message was not seen for ``resend_after_s`` while no step holds the line is sent again. That covers
  every way of losing a message: an API killed between recording the task and sending it, a Redis that
  lost its keys (flushed, evicted, restarted without persistence), a worker killed while it held a
  countdown retry (Redis would redeliver that one only after the visibility timeout).
* When its broker connection comes back after a loss (Redis restarted), a worker sends a fresh message for
  every queued task at once, without waiting for the sweep. Running steps are not interrupted by the loss
  (``worker_cancel_long_running_tasks_on_connection_loss`` is off); the duplicates are dropped by claims.

Engines are per process: a pool process forked from the worker's main process drops the inherited
connection pool (``os.register_at_fork``) and opens its own.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import bootsteps, signals

from service.db import TaskState, TaskStore
from service.jobs import dispatch, remove_dataset
from service.registry import Registry
from service.settings import Settings
from service.staging import clean_staging
from service.train_queue import broker_queue_dir

logger = logging.getLogger(__name__)

_stores: dict[str, TaskStore] = {}


def _forget_inherited_stores() -> None:
    """In a forked child: never touch the parent's pooled connections (close=False), open new ones."""
    for store in _stores.values():
        store.engine.dispose(close=False)
    _stores.clear()


os.register_at_fork(after_in_child=_forget_inherited_stores)


def process_store(settings: Settings) -> TaskStore:
    """This process's task store for the settings' database."""
    url = settings.task_database_url
    if url not in _stores:
        _stores[url] = TaskStore(url)
    return _stores[url]


def process_registry(settings: Settings) -> Registry:
    """The settings' registry."""
    return Registry(settings.registry_dir)


def prepare_data_dir(settings: Settings) -> None:
    """Creates the data directory's parts (registry, staging, broker folder)."""
    for path in (settings.registry_dir, settings.staging_dir):
        path.mkdir(parents=True, exist_ok=True)
    if settings.embedded:
        broker_queue_dir(settings).mkdir(parents=True, exist_ok=True)


def sweep_orphans(settings: Settings) -> tuple[list[str], list[str]]:
    """Requeues (and re-sends) orphaned tasks or fails them past the delivery cap (their data deleted).

    Then deletes the leftover uploads of the staging folder (:func:`service.staging.clean_staging`).

    Returns:
        Ids requeued and ids failed.
    """
    store = process_store(settings)
    requeued, exhausted = store.requeue_orphans(settings.orphan_timeout_s, settings.max_deliveries)
    for task_id, message in exhausted.items():
        remove_dataset(store, task_id)  # before the task reads failed: a finished task has no images left
        store.fail(task_id, None, message)
        logger.warning("task %s failed: %s", task_id, message)
    for task_id in requeued:
        dispatch(store, settings, task_id)
        logger.warning("task %s requeued: its worker died", task_id)
    clean_staging(settings, store)
    return requeued, list(exhausted)


def resend_queued(settings: Settings, skip: frozenset[str] = frozenset()) -> list[str]:
    """Sends a fresh message for every queued task (but those in ``skip``); returns their ids."""
    store = process_store(settings)
    sent = []
    for task_id in store.unfinished():
        if task_id not in skip and store.get(task_id).state == TaskState.QUEUED:
            dispatch(store, settings, task_id)
            sent.append(task_id)
    return sent


def resend_unsent(settings: Settings) -> list[str]:
    """Sends a fresh message for every queued task whose message was not seen for ``resend_after_s``.

    Returns:
        Their ids.
    """
    store = process_store(settings)
    sent = store.unsent_queued(settings.resend_after_s)
    for task_id in sent:
        dispatch(store, settings, task_id)
        logger.warning("task %s re-sent: no message seen for %s s", task_id, settings.resend_after_s)
    return sent


def recover(settings: Settings) -> None:
    """Start-up recovery (see the module docstring)."""
    requeued, _ = sweep_orphans(settings)
    resend_queued(settings, skip=frozenset(requeued))
    process_registry(settings).remove_stale_stages(older_than_s=settings.task_time_limit_s)


class ResendQueuedOnReconnect(bootsteps.StartStopStep):
    """Consumer step: after a lost broker connection is re-established, re-sends the queued tasks.

    Celery starts the consumer's steps again after each reconnection; ``restart_count`` is 0 on the first
    start (whose recovery :func:`recover` does) and counts the reconnections after it.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        settings = consumer.app.conf.get("incseg_settings")
        if settings is None or consumer.restart_count < 1:
            return
        try:
            sent = resend_queued(settings)
        except Exception:  # the broker or the database may be gone again; the next reconnection retries
            logger.exception("re-sending the queued tasks after the broker reconnection failed")
            return
        if sent:
            logger.warning("broker connection re-established: re-sent %d queued task(s) %s", len(sent), sent)


class OrphanSweeper:
    """Daemon thread of the worker's main process repeating :func:`sweep_orphans` and
    :func:`resend_unsent`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.period_s = min(settings.orphan_timeout_s, settings.resend_after_s) / 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="incseg-orphan-sweep", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                sweep_orphans(self.settings)
                resend_unsent(self.settings)
            except Exception:  # the database or the broker may be briefly unreachable; the next sweep retries
                logger.exception("sweep failed")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_sweepers: list[OrphanSweeper] = []


def _settings_of(sender: Any) -> Settings | None:
    return getattr(getattr(sender, "app", None), "conf", {}).get("incseg_settings")


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    settings = _settings_of(sender)
    if settings is not None:
        prepare_data_dir(settings)


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    settings = _settings_of(sender)
    if settings is None:
        return
    recover(settings)
    sweeper = OrphanSweeper(settings)
    sweeper.start()
    _sweepers.append(sweeper)


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    while _sweepers:
        _sweepers.pop().stop()


def worker_argv(settings: Settings, loglevel: str = "INFO") -> list[str]:
    """Arguments of ``celery worker`` for one training process on the settings' queue."""
    return [
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        f"--queues={settings.train_queue}",
        f"--hostname={settings.instance}-{os.getpid()}@%h",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
