"""The model an API process serves, and the zero-downtime swap to a newly activated version.

One :class:`ModelServer` per API process holds ONE reference to the serving version. A request takes a
:meth:`~ModelServer.lease` on it (a reference count), so the reference may be swapped at any time while
requests run. When the registry's active version changes (:class:`service.announce.ActiveWatcher`: Redis
announcement or pointer poll) or :meth:`~ModelServer.request_version` is called, a loader thread opens the
version's export directory (ONNX Runtime on the CPU; TensorRT or ONNX Runtime CUDA on a GPU, as
``export.runtime.open_runtime`` chooses), warms it up, and only then swaps the reference under a lock.
Requests in flight finish on the old runtime, which is closed when its last lease is returned. A version
that fails to open or warm up leaves the old one serving; the failure is recorded (``status().failures``,
``incseg_model_swap_failures_total``) and, while the pointer still names that version, the load is tried
again with exponential backoff (``model_retry_s`` doubled after each failure, at most ``model_retry_max_s``;
``status().retry``, ``incseg_model_load_retries_total``), so a transient error does not leave replicas on
different versions.

While no version serves yet but one is loading (the first activation, an API process that just started),
:meth:`~ModelServer.lease` holds the request until the load finishes, at most ``model_wait_s``: a client
that segments right after its task reads ``done`` gets an answer. :class:`NoModelLoaded` says why a lease
was refused and whether retrying helps (``retry_after_s``).

The pointer is the truth: a loaded version is swapped in only if the pointer still names it, so a late
announcement or request never takes a process back to an older version; going back happens only when
the pointer is moved back (``Registry.activate``, the rollback). This mirrors Triton's load-as-reload
(serve v1 until v2 is ready, then switch; reference/serving.md section 2.1).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field

from export.runtime import SegmentationRuntime, open_runtime
from service.announce import ActiveWatcher, read_pointer
from service.registry import Registry
from service.settings import Settings

logger = logging.getLogger(__name__)

SWAPS = Counter("incseg_model_swaps", "Model versions swapped in (loaded, warmed up, serving).")
SWAP_FAILURES = Counter(
    "incseg_model_swap_failures", "Model versions that failed to load or warm up (the old one kept serving)."
)
ACTIVE_VERSION = Gauge(
    "incseg_active_model_version", "1 for the model version this process serves.", ["version"]
)
LOAD_RETRIES = Counter(
    "incseg_model_load_retries",
    "Loads of the active version tried again after it failed to load or warm up (with backoff).",
)
SWAP_PHASE_SECONDS = Gauge(
    "incseg_model_swap_phase_seconds",
    "Duration of each phase of the last swap: notice (activation to noticed), load, warmup.",
    ["phase"],
)
STOP_JOIN_S = 30.0
RETRY_SOON_S = 1  # Retry-After of a refusal whose cause passes on its own (a load under way, a restart)


class NoModelLoaded(RuntimeError):
    """No model version serves in this process; the message says why and what to do.

    Args:
        message: Why no version serves, and what to do about it.
        retry_after_s: Seconds after which asking again may succeed (a version is loading, or its failed
            load will be tried again then); None when only a client action helps (no version exists yet).
    """

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LoadRetry(BaseModel):
    """The next attempt to load the active version after it failed (``/models``)."""

    version: str = Field(description="the active version that failed to load or warm up")
    attempts: int = Field(description="failed attempts for this activation so far")
    error: str = Field(description="why the last attempt failed")
    next_attempt_at: float = Field(description="when the next attempt starts (Unix time)")
    next_attempt_in_s: float = Field(description="seconds from now until the next attempt")


class ModelServerStatus(BaseModel):
    """What the model server is doing (``/ready``, ``/models``)."""

    active_version: str | None = Field(description="version the registry's pointer names")
    serving_version: str | None = Field(description="version answering requests in this process")
    ready: bool = Field(description="a version is loaded, warmed up and serving")
    serving_precision: str | None = Field(None, description="fp32, fp16 or int8 of the serving version")
    precision_fallback: str | None = Field(
        None, description="why the serving version runs FP32/FP16 although INCSEG_INT8 asks for INT8"
    )
    loading: str | None = Field(description="version being loaded and warmed up, if any")
    failures: dict[str, str] = Field(description="version -> why it failed to load or warm up")
    swaps: int = Field(description="versions swapped in by this process")
    swap_failures: int = Field(description="failed loads or warm-ups in this process")
    retry: LoadRetry | None = Field(description="the next attempt to load the failed active version")
    load_retries: int = Field(description="loads tried again after a failure by this process")
    last_swap: dict[str, Any] | None = Field(
        description="the last swap: version, previous, notice_s (activation to noticed; None when the "
        "activation time is unknown), load_s, warmup_s, swapped_at (Unix time)"
    )


def _unset_active_version(name: str) -> None:
    try:
        ACTIVE_VERSION.remove(name)
    except KeyError:  # another model server in this process (tests) removed it already
        pass


@dataclass(frozen=True)
class _Request:
    """A version to load, and which activation asked for it.

    Attributes:
        version: Version name.
        activation: The pointer's identity (:class:`service.announce.Pointer`) when it named
            ``version``, None when it names another version.
        noticed_at: When this process noticed it (Unix time).
    """

    version: str
    activation: tuple[int, int] | None
    noticed_at: float

    @property
    def notice_s(self) -> float | None:
        """Seconds from the activation (the pointer's mtime) to the notice, when known."""
        if self.activation is None:
            return None
        return max(0.0, self.noticed_at - self.activation[0] / 1e9)


@dataclass(frozen=True)
class _Retry:
    """A failed load of the active version, to be tried again.

    Attributes:
        request: The request that failed (its activation must still be the pointer's).
        attempts: Failed attempts for this activation.
        error: Why the last attempt failed.
        due: When to try again (``time.monotonic()``).
    """

    request: _Request
    attempts: int
    error: str
    due: float


@dataclass
class _Served:
    """A loaded version and the leases on it."""

    version: str
    runtime: SegmentationRuntime
    leases: int = 0
    retired: bool = False


class Lease:
    """One lease on a serving runtime: the runtime is not closed before :meth:`release` is called.

    Args:
        runtime: The leased runtime.
        give_back: Returns the lease to the model server (called once).
    """

    def __init__(self, runtime: SegmentationRuntime, give_back: Callable[[], None]) -> None:
        self.runtime = runtime
        self._give_back: Callable[[], None] | None = give_back
        self._lock = threading.Lock()

    def release(self) -> None:
        """Returns the lease (idempotent); the last lease of a replaced version closes its runtime."""
        with self._lock:
            give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


def open_export(export_dir: Path, settings: Settings, backend: str = "auto") -> SegmentationRuntime:
    """The default loader: ``open_runtime`` on a version's export directory with ``settings.ort_threads``,
    INT8 when ``settings.int8`` (a version without a passing INT8 model serves FP32 and says why)."""
    return open_runtime(export_dir, backend, threads=settings.ort_threads, int8=settings.int8)


class ModelServer:
    """Serves the registry's active version and swaps to a new one without failing a request.

    Args:
        settings: Service settings (``ort_threads``, ``poll_interval_s``, ``redis_url``, ``instance``,
            ``model_wait_s``, ``model_retry_s``, ``model_retry_max_s``).
        registry: The model registry.
        loader: Opens an export directory (default :func:`open_export` with ``backend``); tests inject a
            slow or failing one.
        backend: Runtime backend of the default loader (``auto``: TensorRT > ONNX Runtime CUDA > CPU).
        warmup_iterations: Forward passes at the serving size before a version takes requests.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        loader: Callable[[Path], SegmentationRuntime] | None = None,
        backend: str = "auto",
        warmup_iterations: int = 2,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._loader = loader or partial(open_export, settings=settings, backend=backend)
        self._warmup_iterations = warmup_iterations
        self._state = threading.Condition()
        self._served: _Served | None = None
        self._wanted: _Request | None = None
        self._loading: _Request | None = None
        self._failures: dict[str, str] = {}
        self._failed_activation: dict[str, tuple[int, int] | None] = {}
        self._retry: _Retry | None = None
        self._swaps = 0
        self._swap_failures = 0
        self._load_retries = 0
        self._last_swap: dict[str, Any] | None = None
        self._started = False
        self._stopping = False
        self._loader_thread: threading.Thread | None = None
        self._watcher = ActiveWatcher(settings, registry, self.request_version)

    # lifecycle

    def start(self) -> None:
        """Starts the loader thread and the watcher; the active version (if any) loads in the background."""
        with self._state:
            self._started = True
            self._stopping = False
        self._loader_thread = threading.Thread(
            target=self._load_loop, name="incseg-model-loader", daemon=True
        )
        self._loader_thread.start()
        self._watcher.start()

    def stop(self) -> None:
        """Stops watching and loading; the serving runtime is closed once its last lease is returned."""
        self._watcher.stop()
        with self._state:
            self._stopping = True
            served, self._served = self._served, None
            self._state.notify_all()
        if self._loader_thread is not None:
            self._loader_thread.join(STOP_JOIN_S)
        if served is not None:
            _unset_active_version(served.version)
            self._retire(served)

    # serving

    @contextmanager
    def lease(self, wait_s: float | None = None) -> Iterator[SegmentationRuntime]:
        """The serving runtime for the duration of a request; it is not closed before the lease returns.

        While no version serves but one is loading (a first load or a retry), the call waits for it.

        Args:
            wait_s: Longest wait for a version that is loading (default: ``settings.model_wait_s``).

        Raises:
            NoModelLoaded: No version serves (yet); the message says why, ``retry_after_s`` when to ask
                again (None: no version exists).
        """
        lease = self.acquire(wait_s)
        try:
            yield lease.runtime
        finally:
            lease.release()

    def acquire(self, wait_s: float | None = None) -> Lease:
        """A lease on the serving runtime that the caller returns with :meth:`Lease.release`.

        For a request whose stages run in different threads (``POST /segment``: decode in a worker thread,
        the model in a batch, encode in another thread); otherwise :meth:`lease` returns it on exit.

        Args:
            wait_s: Longest wait for a version that is loading (default: ``settings.model_wait_s``).

        Raises:
            NoModelLoaded: As :meth:`lease`.
        """
        served = self._acquire(self._settings.model_wait_s if wait_s is None else wait_s)
        return Lease(served.runtime, partial(self._return, served))

    def status(self) -> ModelServerStatus:
        """A snapshot of the serving state."""
        active = self._registry.active()
        with self._state:
            return ModelServerStatus(
                active_version=active,
                serving_version=self._served.version if self._served else None,
                ready=self._served is not None,
                serving_precision=self._served.runtime.precision if self._served else None,
                precision_fallback=self._served.runtime.fallback if self._served else None,
                loading=self._loading.version if self._loading else None,
                failures=dict(self._failures),
                swaps=self._swaps,
                swap_failures=self._swap_failures,
                retry=self._retry_status(),
                load_retries=self._load_retries,
                last_swap=dict(self._last_swap) if self._last_swap else None,
            )

    def wait_until_serving(self, version: str | None = None, timeout: float = 60.0) -> bool:
        """Blocks until ``version`` (or any version, when None) serves; False after ``timeout`` seconds."""

        def serving() -> bool:
            return self._served is not None and version in (None, self._served.version)

        with self._state:
            return self._state.wait_for(serving, timeout)

    def wait_until_settled(self, timeout: float = 60.0) -> bool:
        """Blocks until no load is requested or under way (a retry may be pending); False after ``timeout``.

        Once it returns True, every request made before the call has been acted on (swapped in, failed,
        discarded, or found serving already), so a caller can check what did not happen without sleeping.
        """
        with self._state:
            return self._state.wait_for(lambda: self._wanted is None and self._loading is None, timeout)

    def request_version(self, name: str) -> None:
        """Loads ``name`` in the background and swaps to it if the pointer still names it then.

        The watcher calls this on every pointer change; the activate route calls it right after
        ``Registry.activate`` so this process does not wait for the poll. Both calls for one activation
        cause one load: an activation already being loaded, or already failed, is not tried again (a new
        ``activate`` of the same version is, so activating a failed version again retries it). Returns
        at once.
        """
        request = _Request(name, self._pointer_stamp(name), time.time())
        with self._state:
            loading = self._loading
            if loading is not None and (loading.version, loading.activation) == (name, request.activation):
                self._wanted = None  # the load in progress is what the pointer asks for
                return
            if request.activation is not None and self._failed_activation.get(name) == request.activation:
                return  # already failed: the pending retry tries it again
            if request.activation is not None:
                self._retry = None  # a new activation: its retries start over
            self._wanted = request
            self._state.notify_all()

    # waiting for a version

    def _acquire(self, wait_s: float) -> _Served:
        """A lease on the serving version, waiting up to ``wait_s`` for one that is loading."""
        deadline = time.monotonic() + wait_s
        with self._state:
            idle = self._loading is None and self._wanted is None and self._retry is None
            notice = self._served is None and self._started and not self._stopping and idle
        if notice:
            # the pointer may have moved before this process's watcher noticed (a task just read `done`)
            self._watcher.check()
        with self._state:
            while self._served is None:
                refusal = self._refusal(deadline, wait_s)
                if refusal is not None:
                    raise refusal
                self._state.wait(deadline - time.monotonic())
            served = self._served
            served.leases += 1
            return served

    def _refusal(self, deadline: float, wait_s: float) -> NoModelLoaded | None:
        """Why a lease is refused now, or None to wait on (called with ``_state`` held, nothing serving)."""
        now = time.monotonic()
        if self._stopping or not self._started:
            state = "stopped" if self._stopping else "not started"
            return NoModelLoaded(f"the model server is {state}; retry in a moment", RETRY_SOON_S)
        pending = self._loading or self._wanted
        if pending is not None:
            if now < deadline:
                return None
            return NoModelLoaded(
                f"model version {pending.version} is loading and warming up, not ready after {wait_s:g} s; "
                "retry in a moment",
                RETRY_SOON_S,
            )
        retry = self._retry
        if retry is not None:
            in_s = max(0.0, retry.due - now)
            return NoModelLoaded(
                f"model version {retry.request.version} failed to load ({retry.error}); attempt "
                f"{retry.attempts + 1} starts in {in_s:.0f} s, or activate another version",
                max(RETRY_SOON_S, math.ceil(in_s)),
            )
        try:
            active = self._registry.active()
        except OSError:
            active = None
        if active is None:
            return NoModelLoaded("no model version exists yet: post a base task to /tasks first")
        if active in self._failures:
            return NoModelLoaded(
                f"model version {active} failed to load ({self._failures[active]}); activate another version",
                RETRY_SOON_S,
            )
        return NoModelLoaded(f"model version {active} is not loaded yet; retry in a moment", RETRY_SOON_S)

    def _retry_status(self) -> LoadRetry | None:
        retry = self._retry
        if retry is None:
            return None
        in_s = max(0.0, retry.due - time.monotonic())
        return LoadRetry(
            version=retry.request.version,
            attempts=retry.attempts,
            error=retry.error,
            next_attempt_at=time.time() + in_s,
            next_attempt_in_s=in_s,
        )

    def _retry_delay(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failures: doubled each time, capped."""
        return min(self._settings.model_retry_max_s, self._settings.model_retry_s * 2 ** (attempts - 1))

    # loading

    def _pointer_stamp(self, name: str) -> tuple[int, int] | None:
        """The activation identity of the pointer if it names ``name``, else None."""
        try:
            pointer = read_pointer(self._registry)
        except OSError:
            return None
        return pointer.activation if pointer is not None and pointer.version == name else None

    def _load_loop(self) -> None:
        while True:
            with self._state:
                while not (self._stopping or self._wanted is not None or self._retry_is_due()):
                    self._state.wait(None if self._retry is None else self._retry.due - time.monotonic())
                if self._stopping:
                    return
                if self._wanted is not None:
                    request, self._wanted, attempt = self._wanted, None, 1
                else:
                    assert self._retry is not None  # with nothing wanted, the wait ended on a due retry
                    request, attempt, self._retry = self._retry.request, self._retry.attempts + 1, None
                    self._load_retries += 1
                    LOAD_RETRIES.inc()
                if self._served is not None and self._served.version == request.version:
                    self._state.notify_all()  # nothing to load: settled
                    continue
                self._loading = request
            try:
                self._load_and_swap(request, attempt)
            finally:
                with self._state:
                    self._loading = None
                    self._state.notify_all()

    def _retry_is_due(self) -> bool:
        return self._retry is not None and self._retry.due <= time.monotonic()

    def _load_and_swap(self, request: _Request, attempt: int) -> None:
        name = request.version
        try:
            started = time.perf_counter()
            runtime = self._loader(self._registry.export_dir(name))
            loaded = time.perf_counter()
            try:
                runtime.version = name  # the registry's name is the version clients see
                runtime.warmup(self._warmup_iterations)
            except BaseException:
                runtime.close()
                raise
            warmed = time.perf_counter()
        except Exception as error:  # any failure to open or run the version keeps the old one serving
            message = f"{type(error).__name__}: {error}"
            SWAP_FAILURES.inc()
            with self._state:
                self._failures[name] = message
                self._failed_activation[name] = request.activation
                self._swap_failures += 1
                self._loading = None
                # only the pointer's version is tried again; a newer request or activation supersedes it
                if request.activation is not None and self._wanted is None and not self._stopping:
                    delay = self._retry_delay(attempt)
                    self._retry = _Retry(request, attempt, message, time.monotonic() + delay)
                    then = f"attempt {attempt + 1} in {delay:g} s"
                else:
                    then = "not tried again"
                self._state.notify_all()
            logger.error(
                "model version %s failed to load or warm up (attempt %d), keeping the old one; %s: %s",
                name,
                attempt,
                then,
                message,
            )
            return
        with self._state:
            self._loading = None
            pointer = self._registry.active()
            wanted_other = self._wanted is not None and self._wanted.version != name
            superseded = self._stopping or pointer != name or wanted_other
            if superseded:
                old = None
                if not self._stopping and pointer is not None and self._wanted is None:
                    # go where the pointer is now, unless it already failed there (its retry is pending)
                    stamp = self._pointer_stamp(pointer)
                    if stamp is None or self._failed_activation.get(pointer) != stamp:
                        self._wanted = _Request(pointer, stamp, time.time())
            else:
                old, self._served = self._served, _Served(name, runtime)
                self._retry = None
                self._failures.pop(name, None)
                self._failed_activation.pop(name, None)
                self._swaps += 1
                self._last_swap = {
                    "version": name,
                    "previous": old.version if old else None,
                    "notice_s": request.notice_s,
                    "load_s": loaded - started,
                    "warmup_s": warmed - loaded,
                    "swapped_at": time.time(),
                }
                self._state.notify_all()
        if superseded:
            logger.info("discarding %s: the pointer names %s now", name, pointer)
            runtime.close()
            return
        SWAPS.inc()
        ACTIVE_VERSION.labels(version=name).set(1)
        for phase, seconds in (
            ("notice", request.notice_s),
            ("load", loaded - started),
            ("warmup", warmed - loaded),
        ):
            if seconds is not None:
                SWAP_PHASE_SECONDS.labels(phase=phase).set(seconds)
        logger.info(
            "serving %s (was %s): notice %s s, load %.3f s, warm-up %.3f s",
            name,
            old.version if old else None,
            "?" if request.notice_s is None else f"{request.notice_s:.3f}",
            loaded - started,
            warmed - loaded,
        )
        if old is not None:
            _unset_active_version(old.version)
            self._retire(old)

    def _return(self, served: _Served) -> None:
        """Returns one lease on ``served``; the last lease of a retired version closes it."""
        with self._state:
            served.leases -= 1
            close = served.retired and served.leases == 0
        if close:
            self._close(served)

    def _retire(self, served: _Served) -> None:
        """Marks a version as no longer serving; closes it now if no lease holds it, else at the last one."""
        with self._state:
            served.retired = True
            close = served.leases == 0
        if close:
            self._close(served)

    def _close(self, served: _Served) -> None:
        try:
            served.runtime.close()
        except Exception:
            logger.exception("closing model version %s failed", served.version)
