"""The train queue as a sender sees it: queue name, broker options and ``send_train``.

What the API (and the worker's recovery) needs to queue a task, without any worker code: the worker's
Celery app (:mod:`service.celery_app`) is built on :func:`celery_config` and consumes what
:func:`send_train` sends.

Brokers:

* ``INCSEG_REDIS_URL`` set: Redis. The visibility timeout is set above the hard time limit for the broker
  and the result backend, so a long step is never redelivered while it runs.
* Unset: the embedded broker, kombu's *filesystem* transport in ``DATA_DIR/broker``. Chosen over
  SQLAlchemy/SQLite because it needs no database of its own (a second SQLite writer polling every second
  would contend with the task table's writes for SQLite's single write lock) and its messages are plain
  files one can inspect. Neither embedded transport acknowledges: a message is gone once a worker fetched
  it. That is safe here because the task table, not the broker, is the record (see :mod:`service.worker`).

A message is sent to the queue directly (Celery's anonymous exchange for a named queue), so a Redis that
lost its keys (restart without persistence, ``FLUSHDB``, eviction) still receives new messages.

Torch-free: the API process imports it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from celery import Celery

from service.settings import Settings

TRAIN_TASK = "incseg.train"


def broker_queue_dir(settings: Settings) -> Path:
    """Message folder of the embedded broker (created by the worker on start and by senders)."""
    return settings.broker_dir / "queue"


def broker_options(settings: Settings) -> dict[str, Any]:
    """Broker URL and transport options for the settings' mode."""
    if settings.redis_url is not None:
        transport = {"visibility_timeout": settings.visibility_timeout_s}
        return {
            "broker_url": settings.redis_url,
            "broker_transport_options": transport,
            "result_backend": settings.redis_url,
            "result_backend_transport_options": transport,
        }
    queue_dir = broker_queue_dir(settings)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(settings.broker_dir / "control"),  # kombu default: ./control in the cwd
            "store_processed": False,
            "polling_interval": 0.5,
        },
        "result_backend": None,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration shared by the sending app and the worker's app."""
    return {
        **broker_options(settings),
        "task_default_queue": settings.train_queue,
        "task_routes": {TRAIN_TASK: {"queue": settings.train_queue}},
        "task_ignore_result": True,  # the task table is the source of truth, not the result backend
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
    }


@functools.cache
def _sender_for(settings_json: str) -> Celery:
    settings = Settings.model_validate_json(settings_json)
    app = Celery(f"incseg-{settings.instance}-sender", set_as_current=False)
    app.conf.update(**celery_config(settings))
    return app


def sender_app(settings: Settings) -> Celery:
    """The (cached) Celery app that sends the train messages of ``settings``; it runs no task."""
    return _sender_for(settings.model_dump_json(exclude={"api_key"}))


def send_train(settings: Settings, task_id: str) -> None:
    """Queues the train message of a task on ``INSTANCE.train``.

    ``ignore_result``: ``send_task`` does not know the task's own setting and would otherwise subscribe the
    sender to the task's result on the Redis result backend, one subscription per task, never used (the task
    table is the record); after a Redis restart that subscription's reconnection gives up and every later
    ``send_task`` of the process fails with "the Celery application must be restarted".
    """
    if settings.embedded:
        broker_queue_dir(settings).mkdir(parents=True, exist_ok=True)
    sender_app(settings).send_task(TRAIN_TASK, args=[task_id], queue=settings.train_queue, ignore_result=True)
