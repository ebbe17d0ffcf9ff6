"""Submitting and cancelling tasks: what the API (and any other producer) calls.

Torch-free: the API process imports it.
"""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError

from service.archive import StagedDataset, remove_staged
from service.celery_app import send_train
from service.db import TaskState, TaskStore, TaskView
from service.settings import Settings

logger = logging.getLogger(__name__)


class QueueUnavailable(RuntimeError):
    """The broker could not be reached to queue a task (Redis down or restarting); the message says so."""


def submit_task(
    store: TaskStore, settings: Settings, staged: StagedDataset, method: str, options: dict
) -> TaskView:
    """Records a queued task for a staged dataset and sends it to the train queue.

    Args:
        store: The task table.
        settings: Where the queue is.
        staged: The checked dataset (``service.archive.receive_dataset``); the task owns it from now on.
        method: Method spec (e.g. ``mib``).
        options: Training options of the step (``StepOptions`` fields).

    Returns:
        The queued task.

    Raises:
        QueueUnavailable: The broker cannot be reached; the task is then failed and its data deleted.
        Exception: Any other refusal of the message, with the same clean-up.
    """
    task = store.create(method, options, staged.new_classes, staged.path)
    try:
        send_train(settings, task.id)
    except Exception as err:
        message = f"could not queue the task ({type(err).__name__}: {err}); post it again"
        store.fail(task.id, None, message)
        remove_staged(staged.path)
        store.clear_dataset(task.id)
        if isinstance(err, OperationalError):
            raise QueueUnavailable(
                f"the task queue (broker) is unreachable: {err}; nothing was queued, post the task again "
                "in a moment"
            ) from err
        raise
    logger.info("task %s queued: %s + %s", task.id, method, ", ".join(staged.new_classes))
    return task


def cancel_task(store: TaskStore, settings: Settings, task_id: str) -> TaskView:
    """Cancels a task: a queued one at once (its data deleted), a running one at its next check.

    A running task stops between two iterations or phases; its worker then marks it cancelled, leaves
    the active version as it was and deletes the staged data. Until then the answer shows it running.

    Raises:
        TaskNotFound: No such task.
        TaskConflict: The task already finished.
    """
    task = store.request_cancel(task_id)
    if task.state == TaskState.CANCELLED:
        path = store.dataset_dir(task_id)
        if path is not None:
            remove_staged(path)
            store.clear_dataset(task_id)
    return task
