"""The worker's Celery app: a thin adapter that delivers task ids to :func:`service.pipeline.run_task`.

``celery -A service.celery_app worker`` (what ``incseg worker`` runs) uses the module-level ``app``, built
from the environment's settings. Senders (the API) use :mod:`service.train_queue`, which imports no worker
code; brokers are described there.

With Redis: late acknowledgement (``task_acks_late``), one message at a time
(``worker_prefetch_multiplier=1``), and ``task_reject_on_worker_lost``: a pool process killed mid-step
(SIGKILL, out of memory) puts its message back, and the task table caps the redeliveries
(``max_deliveries``, counted as ``attempts``). A message lost anyway (see :mod:`service.worker`) is sent
again by the worker's sweep; claims drop duplicates.

Pool: prefork with one process (``-c 1``), so the soft and hard time limits work (the solo and threads
pools have none), a killed step takes only its pool process down (the parent requeues its message), and
``worker_max_tasks_per_child=1`` gives every step a fresh process (all GPU memory freed; the parent never
imports torch). Prefork children are daemonic and may not start DataLoader workers, so the pipeline runs
the loader in-process (``workers=0``, see :func:`service.pipeline.step_options`).
"""

from __future__ import annotations

import functools
import logging

from celery import Celery, Task

from service import worker
from service.settings import Settings, get_settings
from service.train_queue import TRAIN_TASK, celery_config


def make_celery(settings: Settings) -> Celery:
    """The worker's Celery app for ``settings``, with the train task and the worker's recovery on it."""
    app = Celery(f"incseg-{settings.instance}")
    app.conf.update(
        **celery_config(settings),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
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
    """The (cached) worker app of ``settings``."""
    if settings is get_settings():
        return app
    return _app_for(settings.model_dump_json(exclude={"api_key"}))


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    """Runs a worker in this process until it is stopped (SIGTERM: finish the step; SIGQUIT: now)."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    celery_app_for(settings).worker_main(worker.worker_argv(settings, loglevel))


app = make_celery(get_settings())
