"""The Celery app: a thin adapter that delivers task ids to :func:`service.pipeline.run_task`.

``celery -A service.celery_app worker`` (what ``incseg worker`` runs) uses the module-level ``app``, built
from the environment's settings. The API builds the same app for its own settings to send tasks.

Brokers:

* ``INCSEG_REDIS_URL`` set: Redis. Late acknowledgement (``task_acks_late``), one message at a time
  (``worker_prefetch_multiplier=1``), and ``task_reject_on_worker_lost``: a pool process killed mid-step
  (SIGKILL, out of memory) puts its message back, and the task table caps the redeliveries
  (``max_deliveries``, counted as ``attempts``). The visibility timeout is set above the hard time limit
  for the broker and the result backend, so a long step is never redelivered while it runs.
* Unset: the embedded broker, kombu's *filesystem* transport in ``DATA_DIR/broker``. Chosen over
  SQLAlchemy/SQLite because it needs no database of its own (a second SQLite writer polling every second
  would contend with the task table's writes for SQLite's single write lock) and its messages are plain
  files one can inspect. Neither embedded transport acknowledges: a message is gone once a worker fetched
  it. That is safe here because the task table, not the broker, is the record: on start, a worker
  re-sends a message for every unfinished task and requeues orphans, and claims drop duplicates.

Pool: prefork with one process (``-c 1``), so the soft and hard time limits work (the solo and threads
pools have none), a killed step takes only its pool process down (the parent requeues its message), and
``worker_max_tasks_per_child=1`` gives every step a fresh process (all GPU memory freed; the parent never
imports torch). Prefork children are daemonic and may not start DataLoader workers, so the pipeline runs
the loader in-process (``workers=0``, see :func:`service.pipeline.step_options`).
"""

from __future__ import annotations

import functools
from pathlib import Path

from celery import Celery, Task

from service import worker  # noqa: F401 - connects the worker's start-up and shutdown signal handlers
from service.settings import Settings, get_settings

TRAIN_TASK = "incseg.train"


def broker_queue_dir(settings: Settings) -> Path:
    """Message folder of the embedded broker (created by the worker on start and by senders)."""
    return settings.broker_dir / "queue"


def broker_options(settings: Settings) -> dict:
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


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with the train task registered on it."""
    app = Celery(f"incseg-{settings.instance}")
    app.conf.update(
        **broker_options(settings),
        task_default_queue=settings.train_queue,
        task_routes={TRAIN_TASK: {"queue": settings.train_queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_ignore_result=True,  # the task table is the source of truth, not the result backend
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # a step keeps running when the broker connection drops (Redis restarted): the task table, not the
        # message, is its record; Celery 6 would cancel it by default
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf.incseg_settings = settings
    app.steps["consumer"].add(worker.ResendQueuedOnReconnect)

    @app.task(name=TRAIN_TASK, bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
    def train(self: Task, task_id: str) -> str:
        """Runs one task when it is its turn; redelivers itself later while the model line is busy."""
        from service.db import ClaimOutcome
        from service.pipeline import run_task

        claim = run_task(task_id, settings, worker.process_store(settings), worker.process_registry(settings))
        if claim.outcome == ClaimOutcome.WAIT:
            raise self.retry(countdown=settings.line_wait_s)
        return claim.task.state.value

    return app


@functools.cache
def _app_for(settings_json: str) -> Celery:
    return make_celery(Settings.model_validate_json(settings_json))


def celery_app_for(settings: Settings) -> Celery:
    """The (cached) app of ``settings``: what the API uses to send tasks."""
    if settings is get_settings():
        return app
    return _app_for(settings.model_dump_json(exclude={"api_key"}))


def send_train(settings: Settings, task_id: str) -> None:
    """Queues the train message of a task on ``INSTANCE.train``.

    ``ignore_result``: ``send_task`` does not know the task's own setting and would otherwise subscribe the
    sender to the task's result on the Redis result backend, one subscription per task, never used (the task
    table is the record); after a Redis restart that subscription's reconnection gives up and every later
    ``send_task`` of the process fails with "the Celery application must be restarted".
    """
    if settings.embedded:
        broker_queue_dir(settings).mkdir(parents=True, exist_ok=True)
    celery_app_for(settings).send_task(
        TRAIN_TASK, args=[task_id], queue=settings.train_queue, ignore_result=True
    )


app = make_celery(get_settings())
