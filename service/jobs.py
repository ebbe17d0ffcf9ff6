"""Submitting, sending and cancelling tasks, and deleting their uploaded datasets.

What the API (and any other producer) calls, and what the worker's recovery re-sends with. Torch-free: the
API process imports it.
"""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError

from service.archive import StagedDataset, remove_staged
from service.db import TaskState, TaskStore, TaskView
from service.settings import Settings
from service.train_queue import send_train

logger = logging.getLogger(__name__)


class QueueUnavailable(RuntimeError):
    """The broker could not be reached to queue a task (Redis down or restarting); the message says so."""


def dispatch(store: TaskStore, settings: Settings, task_id: str) -> None:
    """Sends the train message of a task and records the send (its ``message_at``).

    Raises:
        Exception: The broker refused the message (nothing is recorded).
    """
    send_train(settings, task_id)
    store.record_message(task_id)


def remove_dataset(store: TaskStore, task_id: str) -> None:
    """Deletes a task's staged dataset (archive contents: images and masks) and forgets its path."""
    path = store.dataset_dir(task_id)
    if path is not None:
        remove_staged(path)
        store.clear_dataset(task_id)


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
        Exception: A database error recording the task (the staged data is deleted), or any other refusal
            of the message (the task is failed and its data deleted).
    """
    try:
        task = store.create(method, options, staged.new_classes, staged.path, staged.supervision)
    except BaseException:
        remove_staged(staged.path)
        raise
    try:
        dispatch(store, settings, task.id)
    except Exception as err:
        message = f"could not queue the task ({type(err).__name__}: {err}); post it again"
        remove_dataset(store, task.id)
        store.fail(task.id, None, message)
        if isinstance(err, OperationalError):
            raise QueueUnavailable(
                f"the task queue (broker) is unreachable: {err}; nothing was queued, post the task again "
                "in a moment"
            ) from err
        raise
    logger.info(
        "task %s queued: %s + %s (%s supervision)",
        task.id,
        method,
        ", ".join(staged.new_classes),
        task.supervision,
    )
    return task


def cancel_task(store: TaskStore, settings: Settings, task_id: str) -> TaskView:
    """Cancels a task: a queued one at once (its data deleted), a running one at its next check.

    A running task stops between two iterations or phases; its worker then marks it cancelled, leaves
    the active version as it was and deletes the staged data. Until then the answer shows it running.
    Once its worker recorded the version it published, a task can no longer be cancelled.

    Raises:
        TaskNotFound: No such task.
        TaskConflict: The task already finished, or it is activating the version it published.
    """
    task = store.request_cancel(task_id)
    if task.state == TaskState.CANCELLED:
        remove_dataset(store, task_id)
    return task
