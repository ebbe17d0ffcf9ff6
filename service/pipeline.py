"""One task from claim to published version: the library function the Celery task calls.

``run_task`` claims the task in the task table (which enforces the model line's order, see
:meth:`service.db.TaskStore.claim`), trains the step on the active version with
``training.step.run_step``, exports ONNX at the serving size behind the parity gate (with
``INCSEG_INT8``, also an INT8 model calibrated on the step's images while they exist, keeping only the
activation ranges beside the version), builds a TensorRT engine where TensorRT and a GPU exist, publishes
the version into the registry, activates and announces it, and records metrics and the version in the
task table. Whatever happens, the task's staged dataset (every extracted image and mask) is deleted once
the task is finished, failed or cancelled.

Publish -> activate -> done is recoverable at every point. Once the version is published, the worker
records it in the task's row (``staged_version``) if no cancellation was requested first (from then on a
``DELETE`` is refused), then activates it with a compare-and-swap on the base version under the registry's
lock, then marks the task done. A worker taking over a task whose holder died after publishing (found by
the recorded version, or by the version's ``task_id`` when the holder died before recording it) does not
train again: it activates that version if the base is still active (or finds it active already) and marks
the task done.

While it runs, a heartbeat thread refreshes the task's ``heartbeat_at`` (so a live task is never taken
for an orphan, even in long phases without progress) and turns a cancel request into the trainer's
``should_stop`` signal; progress is written to the task table at most every ``progress_interval_s``
(phase changes at once).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import multiprocessing
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded

from service.db import FINISHED_STATES, Claim, ClaimOutcome, TaskState, TaskStore, TaskView
from service.holder import worker_id
from service.jobs import remove_dataset
from service.registry import EXPORT_SUBDIR, MODEL_SUBDIR, ActivationConflict, Registry, VersionInfo
from service.settings import Settings

if TYPE_CHECKING:  # training (torch) is imported where a step runs, not when the worker starts
    from export.int8 import Int8Calibration
    from training.trainer import StepOptions, StepProgress

logger = logging.getLogger(__name__)

EXPORTING_PHASE = "exporting"
ENGINE_PHASE = "tensorrt"
PUBLISHING_PHASE = "publishing"


# errors of a write that found no room: no space, quota exceeded, file larger than allowed
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# a failed write with less than this left on its file system is taken for a full disk (see disk_full_guard)
NEARLY_FULL_BYTES = 1 << 20


class LostTask(RuntimeError):
    """Another worker took the task over (this one looked dead); stop without touching it."""


class DiskFull(RuntimeError):
    """The registry's file system ran out of space while a new version was written; the message says where."""


def _has_disk_full_errno(error: BaseException) -> bool:
    """Whether an OSError with a no-space errno is in the exception's chain."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def disk_full_guard(directory: Path, active: str | None) -> Iterator[None]:
    """Turns a write that failed for want of space under ``directory`` into :class:`DiskFull`.

    An OSError with ENOSPC, EDQUOT or EFBIG in the chain is a full disk. ``torch.save`` reports one as a
    RuntimeError without an errno ("unexpected pos ..."), so an OSError or RuntimeError also counts when
    fewer than :data:`NEARLY_FULL_BYTES` are left on the file system at the moment of the failure (checked
    here, before the staging directory is removed and its space returned).

    Args:
        directory: The staging directory of the version being written (inside the registry).
        active: The active version, named in the message as unchanged.
    """
    try:
        yield
    except LostTask:
        raise
    except (OSError, RuntimeError) as error:
        try:
            usage = shutil.disk_usage(directory)
        except OSError:
            usage = None
        if usage is None or not (_has_disk_full_errno(error) or usage.free < NEARLY_FULL_BYTES):
            raise
        raise DiskFull(
            f"the disk of the model registry is full: {usage.free} bytes free of {usage.total} on the file "
            f"system of {directory.parent} while the new version was written ({type(error).__name__}: "
            f"{error}); free space there or enlarge the volume, then post the task again; nothing was "
            f"published and the active version ({active or 'none'}) is unchanged"
        ) from error


class Heartbeat:
    """Background thread: refreshes the task's heartbeat, turns a cancel request into ``stop``.

    Args:
        store: The task table.
        task_id: The held task.
        worker: Its holder (this process).
        interval_s: Seconds between two beats.
    """

    def __init__(self, store: TaskStore, task_id: str, worker: str, interval_s: float) -> None:
        self.store, self.task_id, self.worker, self.interval_s = store, task_id, worker, interval_s
        self.stop = threading.Event()  # set: the step must stop (cancel requested or task lost)
        self.lost = False
        self.cancel_requested = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{task_id}", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                beat = self.store.heartbeat(self.task_id, self.worker)
            except Exception:  # a database hiccup must not kill the step; the next beat retries
                logger.exception("heartbeat of task %s failed", self.task_id)
                continue
            if not beat.held:
                self.lost = True
                self.stop.set()
            elif beat.cancel_requested:
                self.cancel_requested = True
                self.stop.set()

    def check(self, phase: str) -> None:
        """Raises when the step must stop before ``phase``.

        Raises:
            LostTask: Another worker holds the task now.
            training.trainer.StepCancelled: Cancellation was requested.
        """
        from training.trainer import StepCancelled

        if self.lost:
            raise LostTask(f"task {self.task_id} was taken over by another worker")
        if self.stop.is_set():
            raise StepCancelled(f"cancelled before {phase}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class ProgressWriter:
    """``on_progress`` callback writing to the task table: phase changes at once, iterations throttled."""

    def __init__(self, store: TaskStore, task_id: str, worker: str, interval_s: float, heartbeat: Heartbeat):
        self.store, self.task_id, self.worker, self.interval_s = store, task_id, worker, interval_s
        self.heartbeat = heartbeat
        self.phase: str | None = None
        self.last_write = -math.inf

    def __call__(self, progress: StepProgress) -> None:
        phase = progress.phase
        now = time.monotonic()
        final = progress.iteration == progress.total_iterations
        if phase == self.phase and not final and now - self.last_write < self.interval_s:
            return
        loss = progress.loss if math.isfinite(progress.loss) else None
        self.write(phase, epoch=progress.epoch, fraction=progress.fraction, loss=loss)

    def write(
        self,
        phase: str,
        state: TaskState | None = None,
        epoch: int | None = None,
        fraction: float | None = None,
        loss: float | None = None,
    ) -> None:
        """Writes one progress record; notes a lost task for the next stop check."""
        self.phase, self.last_write = phase, time.monotonic()
        recorded = self.store.progress(
            self.task_id, self.worker, phase, epoch=epoch, fraction=fraction, loss=loss, state=state
        )
        if not recorded:
            self.heartbeat.lost = True
            self.heartbeat.stop.set()


# The model a step 0 builds on a machine without CUDA: BENCHMARKS.md's CPU configuration (ResNet-10 context
# path, narrow heads). The default ResNet-18 with 128/256 channels trains several times slower on a CPU.
CPU_MODEL_OPTIONS = {"backbone": "resnet10", "context_channels": 64, "embed_channels": 128}


def machine_options() -> dict:
    """Step options sized for this machine: :data:`CPU_MODEL_OPTIONS` without CUDA, none with it."""
    import torch

    return {} if torch.cuda.is_available() else dict(CPU_MODEL_OPTIONS)


def step_options(settings: Settings, task_options: dict) -> StepOptions:
    """The task's ``StepOptions``: settings defaults < :func:`machine_options` < ``settings.step_options``
    < the task's own options.

    A Celery prefork child is a daemonic process and may not start DataLoader workers ("daemonic processes
    are not allowed to have children"), so ``workers`` is forced to 0 there: loading then runs in the
    training process, which costs little next to a step on these dataset sizes.
    """
    from training.trainer import StepOptions

    options = StepOptions(
        **{
            "epochs": settings.default_epochs,
            "size": settings.default_size,
            "batch_size": settings.default_batch_size,
            **machine_options(),
            **settings.step_options,
            **task_options,
        }
    )
    if options.workers and multiprocessing.current_process().daemon:
        logger.info("data loader workers %d -> 0: this worker process is daemonic", options.workers)
        options = options.model_copy(update={"workers": 0})
    return options


def int8_calibration(
    registry: Registry, base_version: str | None, dataset: Path, classes: list[str], size: tuple[int, int]
) -> Int8Calibration:
    """What the export calibrates its INT8 model on: the step's dataset (deleted after the task) and the base
    version's table, whose ranges are merged in so that classes the step's images do not show stay covered
    (see BENCHMARKS.md, "INT8")."""
    from export.int8 import load_calibration
    from export.manifest import CALIBRATION_FILE
    from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    earlier = []
    if base_version is not None:
        table = registry.export_dir(base_version) / CALIBRATION_FILE
        earlier = [table] if table.is_file() else []
    return load_calibration(dataset, classes, size, IMAGENET_MEAN, IMAGENET_STD, earlier_tables=earlier)


def build_engine_if_possible(export_dir: Path, int8: bool = False) -> str:
    """Builds the TensorRT engine next to the ONNX export where TensorRT and a GPU exist: INT8 when asked for
    and the export's INT8 model passed its gate, else FP16.

    Returns:
        What happened, for ``VersionInfo.engine``: ``"built: ..."`` or ``"not built: <reason>"``. A failed
        build does not stop the version (ONNX Runtime serves it); the API rebuilds on its own GPU if needed.
    """
    from export.tensorrt_engine import ensure_engine, serving_precision, tensorrt_available

    if not tensorrt_available():
        return "not built: no CUDA GPU with TensorRT on the worker"
    try:
        build = ensure_engine(export_dir, precision=serving_precision(export_dir, True, int8))
    except Exception as err:
        logger.exception("TensorRT build failed for %s", export_dir)
        return f"not built: {type(err).__name__}: {err}"
    manifest = build.manifest
    return (
        f"built: {manifest['precision']} for {manifest['gpu_name']} "
        f"(compute {manifest['compute_capability']}, TensorRT {manifest['tensorrt_version']}), "
        f"{manifest['build_seconds']} s"
    )


def announce(settings: Settings, version: str) -> None:
    """Announces a new active version (``service.announce``; the pointer file stays the truth)."""
    try:
        from service.announce import announce_active
    except ImportError:  # pragma: no cover - the announcement only shortens the notice time
        logger.warning("service.announce is not available; API processes notice %s by polling", version)
        return
    announce_active(settings, version)


def published_version(task: TaskView, store: TaskStore, registry: Registry) -> VersionInfo | None:
    """The version an earlier attempt of an unfinished task published, or None.

    The row's ``staged_version`` names it; a holder that died between publishing and recording it left
    the task's id in the version's ``version.json``.
    """
    if task.attempts == 0 or task.state in FINISHED_STATES:
        return None
    name = store.staged_version(task.id)
    return registry.get(name) if name is not None else registry.published_by(task.id)


def run_task(
    task_id: str, settings: Settings, store: TaskStore, registry: Registry, worker: str | None = None
) -> Claim:
    """Claims a delivered task and, when it is its turn, runs it to a published, active version.

    Args:
        task_id: The task.
        settings: Serving size, intervals, limits.
        store: The task table.
        registry: The model registry.
        worker: Holder identity (default: this process, ``host:pid``).

    Returns:
        The claim's outcome with the task as it ended: RUN (it ran; its state says how it ended), WAIT
        (not its turn: deliver again later), DROP (finished meanwhile) or GAVE_UP (too many deliveries).
    """
    worker = worker or worker_id()
    published = published_version(store.get(task_id), store, registry)
    base = published.base_version if published is not None else registry.active()
    claim = store.claim(task_id, worker, settings.orphan_timeout_s, settings.max_deliveries, base)
    logger.info("task %s: %s (%s)", task_id, claim.outcome.value, claim.reason)
    if claim.outcome == ClaimOutcome.WAIT:
        store.record_message(task_id)  # delivered: the sweep does not take its message for lost
    if claim.outcome == ClaimOutcome.DROP and claim.task.state in FINISHED_STATES:
        remove_dataset(store, task_id)  # e.g. cancelled while queued: its data may still be there
    if claim.outcome == ClaimOutcome.GAVE_UP:
        remove_dataset(store, task_id)  # before the task reads failed: a finished task has no images left
        return Claim(claim.outcome, store.fail(task_id, None, claim.reason), claim.reason)
    if claim.outcome != ClaimOutcome.RUN:
        return claim
    task = _run_claimed(claim.task, settings, store, registry, worker, published)
    return Claim(ClaimOutcome.RUN, task, claim.reason)


def _run_claimed(
    task: TaskView,
    settings: Settings,
    store: TaskStore,
    registry: Registry,
    worker: str,
    published: VersionInfo | None,
) -> TaskView:
    heartbeat = Heartbeat(store, task.id, worker, settings.heartbeat_interval_s)
    with heartbeat:  # beating before the slow imports below (torch), which may take seconds
        return _run_beating(task, settings, store, registry, worker, heartbeat, published)


def _run_beating(
    task: TaskView,
    settings: Settings,
    store: TaskStore,
    registry: Registry,
    worker: str,
    heartbeat: Heartbeat,
    published: VersionInfo | None,
) -> TaskView:
    """Runs the step (or finishes the publication of ``published``, a version an earlier attempt
    published) and records how it ended, deleting the staged data first (a task seen finished has no
    images left), unless another worker took the task over."""
    from export.parity import ParityError
    from training.data import DataError
    from training.trainer import StepCancelled

    started = time.monotonic()
    try:
        if published is not None:
            logger.info("task %s: finishing the publication of %s", task.id, published.name)
            record = _stage_and_activate(task.id, settings, store, registry, worker, published)
        else:
            record = _train_and_publish(task, settings, store, registry, worker, heartbeat)
    except LostTask as err:
        logger.warning("task %s: %s; leaving it to its new holder", task.id, err)
        return store.get(task.id)
    except StepCancelled as err:
        if heartbeat.lost:
            return store.get(task.id)
        message = f"{err} on request; the active version is unchanged"
        record = functools.partial(store.cancelled, task.id, worker, message)
    except ParityError as err:
        record = functools.partial(store.fail, task.id, worker, f"{err}; nothing was activated")
    except DiskFull as err:
        logger.error("task %s: %s", task.id, err)
        record = functools.partial(store.fail, task.id, worker, str(err))
    except SoftTimeLimitExceeded:
        message = (
            f"stopped after {time.monotonic() - started:.0f} s by the soft time limit "
            f"({settings.task_soft_time_limit_s} s, INCSEG_TASK_SOFT_TIME_LIMIT_S); "
            "the active version is unchanged"
        )
        record = _done_if_activated(task.id, store, registry, worker) or functools.partial(
            store.fail, task.id, worker, message
        )
    except (DataError, ValueError, FileNotFoundError) as err:
        record = functools.partial(store.fail, task.id, worker, str(err))
    except Exception as err:
        logger.exception("task %s failed", task.id)
        record = _done_if_activated(task.id, store, registry, worker) or functools.partial(
            store.fail, task.id, worker, f"{type(err).__name__}: {err}"
        )
    remove_dataset(store, task.id)
    return record()


def _train_and_publish(
    task: TaskView,
    settings: Settings,
    store: TaskStore,
    registry: Registry,
    worker: str,
    heartbeat: Heartbeat,
) -> Callable[[], TaskView]:
    """Step, export, engine, publication and activation.

    Returns:
        What records the outcome in the task table (called once the staged data is deleted).
    """
    from export.onnx_export import export_onnx
    from training.step import run_step

    writer = ProgressWriter(store, task.id, worker, settings.progress_interval_s, heartbeat)
    with registry.staging() as stage, disk_full_guard(stage, task.base_version):
        dataset = store.dataset_dir(task.id)
        if dataset is None or not dataset.is_dir():
            raise FileNotFoundError(f"the staged dataset of task {task.id} is gone ({dataset})")
        base_dir = registry.model_dir(task.base_version) if task.base_version else None
        options = step_options(settings, task.options)
        bundle, _ = run_step(
            base_dir,
            dataset,
            task.method,
            options,
            stage / MODEL_SUBDIR,
            writer,
            should_stop=heartbeat.stop.is_set,
        )
        # the step record's metrics: the validation scores (None without val masks) and, for a weak step,
        # its pseudo-labels' statistics ("pseudo_labels")
        metrics = bundle.history[-1].get("metrics")
        heartbeat.check(EXPORTING_PHASE)
        writer.write(EXPORTING_PHASE, state=TaskState.EXPORTING, fraction=1.0)
        size = (settings.serve_size, settings.serve_size)
        int8 = None
        if settings.int8:  # now, while the task's images exist
            int8 = int8_calibration(registry, task.base_version, dataset, bundle.classes, size)
        export_onnx(bundle, stage / EXPORT_SUBDIR, size, int8=int8)  # raises ParityError: nothing published
        heartbeat.check(ENGINE_PHASE)
        writer.write(ENGINE_PHASE)
        engine = build_engine_if_possible(stage / EXPORT_SUBDIR, settings.int8)
        heartbeat.check(PUBLISHING_PHASE)
        writer.write(PUBLISHING_PHASE)
        return _publish(task, settings, store, registry, worker, stage, metrics, engine)


def _done_if_activated(
    task_id: str, store: TaskStore, registry: Registry, worker: str
) -> Callable[[], TaskView] | None:
    """What records the task done when the version it published is active (an error came after the
    activation), or None."""
    name = store.staged_version(task_id)
    if name is None or registry.active() != name:
        return None
    logger.warning("task %s: %s is active; the error after its activation does not undo it", task_id, name)
    return functools.partial(store.finish, task_id, worker, name, registry.get(name).metrics)


def _publish(
    task: TaskView,
    settings: Settings,
    store: TaskStore,
    registry: Registry,
    worker: str,
    stage: Path,
    metrics: dict | None,
    engine: str,
) -> Callable[[], TaskView]:
    """Publishes the staged version, then records and activates it (:func:`_stage_and_activate`).

    Raises:
        LostTask: Another worker holds the task now (nothing is published).
    """
    if not store.heartbeat(task.id, worker).held:
        raise LostTask(f"task {task.id} was taken over by another worker before publishing")
    info = registry.publish(
        stage, metrics=metrics, task_id=task.id, base_version=task.base_version, engine=engine
    )
    return _stage_and_activate(task.id, settings, store, registry, worker, info)


def _stage_and_activate(
    task_id: str, settings: Settings, store: TaskStore, registry: Registry, worker: str, info: VersionInfo
) -> Callable[[], TaskView]:
    """Records the published version in the task's row, then activates it, fenced on its base.

    Cancellation requested before the record wins: the version stays published but inactive and the task
    ends cancelled. A version activated by hand while the step ran (a rollback through the API) wins too:
    the compare-and-swap under the registry's lock fails, and the task fails with a message saying which
    version to activate. A version found active already (activated by a holder that died before marking
    the task done) is the task's result.

    Raises:
        LostTask: Another worker holds the task now (it finishes the publication).
    """
    staged = store.stage_version(task_id, worker, info.name)
    if not staged.held:
        raise LostTask(f"task {task_id} was taken over by another worker after publishing {info.name}")
    if staged.cancel_requested:
        message = (
            f"cancelled on request while publishing; {info.name} was published but not activated, the "
            f"active version ({registry.active() or 'none'}) is unchanged"
        )
        return functools.partial(store.cancelled, task_id, worker, message)
    if registry.active() != info.name:
        try:
            registry.activate(info.name, expected=info.base_version)
        except ActivationConflict as conflict:
            message = (
                f"the active version changed from {info.base_version} to {conflict.active} while the step "
                f"ran; {info.name} was published but not activated (POST /models/{info.name}/activate to "
                "use it)"
            )
            return functools.partial(
                store.fail, task_id, worker, message, model_version=info.name, metrics=info.metrics
            )
    announce(settings, info.name)
    logger.info("task %s: published and activated %s", task_id, info.name)
    return functools.partial(store.finish, task_id, worker, info.name, info.metrics)
