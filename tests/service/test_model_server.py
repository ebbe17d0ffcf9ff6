"""ModelServer lifecycle, Triton style: swap under concurrent clients with a slow load, broken versions,
rollback, late requests, no model yet, and the notice time with and without a Redis announcement.

Versions are real: a tiny BiSeNet exported once per module at 32x32 (ONNX Runtime CPU sessions), copied
into the registry through its staging and publishing path.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from export.manifest import MANIFEST_FILE, ONNX_FILE
from export.onnx_export import export_onnx
from export.runtime import OrtRuntime, SegmentationRuntime, resolve_backend
from service.announce import announce_active
from service.model_server import ModelServer, NoModelLoaded
from service.registry import EXPORT_SUBDIR, MODEL_SUBDIR, Registry
from service.settings import Settings
from tests.helpers import save_tiny_model
from tests.service.loaders import BlockingLoader, FlakyLoader

CLASSES = ["background", "a", "b"]
IMAGE = np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)
NEVER_S = 3600.0  # a poll interval no test outlives: only a Redis message can wake the watcher
WAIT_S = 30.0  # how long a test waits for something that must happen


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory and its 32x32 export, to copy into registries."""
    root = tmp_path_factory.mktemp("template")
    save_tiny_model(root / MODEL_SUBDIR, CLASSES, history=[{"step": 0}])
    export_onnx(root / MODEL_SUBDIR, root / EXPORT_SUBDIR, (32, 32), parity_batches=(1,))
    return root


def publish(registry: Registry, template: Path, damage: Callable[[Path], None] | None = None) -> str:
    """Publishes a copy of the template version, after ``damage(export_dir)`` when given; returns its name."""
    with registry.staging() as stage:
        for part in (MODEL_SUBDIR, EXPORT_SUBDIR):
            shutil.copytree(template / part, stage / part)
        if damage is not None:
            damage(stage / EXPORT_SUBDIR)
        return registry.publish(stage, metrics=None, task_id=None, base_version=None, engine="not built").name


def truncate_onnx(export_dir: Path) -> None:
    path = export_dir / ONNX_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(export_dir: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((export_dir / MANIFEST_FILE).read_text())
    edit(manifest)
    (export_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def wrong_input_size(export_dir: Path) -> None:
    """A manifest that promises 48x48 for a 32x32 graph: opens fine, fails in the warm-up forward pass."""
    _edit_manifest(export_dir, lambda manifest: manifest.update(input_size=[48, 48]))


def failed_parity(export_dir: Path) -> None:
    _edit_manifest(export_dir, lambda manifest: manifest["parity"].update(passed=False))


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class RecordingLoader(BlockingLoader):
    """The real loader, keeping every runtime it opened; a load of ``held`` waits for :attr:`release`."""

    def __init__(self, settings: Settings, held: str | None = None) -> None:
        super().__init__(settings, held)
        self.opened: dict[str, list[SegmentationRuntime]] = {}

    def __call__(self, export_dir: Path) -> SegmentationRuntime:
        runtime = super().__call__(export_dir)
        self.opened.setdefault(export_dir.parent.name, []).append(runtime)
        return runtime


def settle(server: ModelServer) -> None:
    """Waits until the server's watcher has read the pointer twice more and the loads it asked for ended.

    The second read began after this call, so whatever the pointer says now has been acted on: a test
    can then assert that something did NOT happen, without sleeping through poll intervals.
    """
    watcher = server._watcher
    assert watcher.wait_for_checks(watcher.checks + 2, WAIT_S), "the watcher stopped reading the pointer"
    assert server.wait_until_settled(WAIT_S), "a requested load did not end"


@pytest.fixture
def make_server(registry: Registry) -> Iterator[Callable[..., ModelServer]]:
    servers = []

    def make(settings: Settings, loader: Callable[[Path], SegmentationRuntime] | None = None) -> ModelServer:
        server = ModelServer(settings, registry, loader)  # None: the default loader (backend auto)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


def segment(server: ModelServer) -> str:
    """One request: a lease, a prediction, the version that answered."""
    with server.lease() as runtime:
        (mask,) = runtime.predict([IMAGE])
        assert mask.shape == IMAGE.shape[:2]
        return runtime.version


def _metric(name: str, labels: dict[str, str] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, labels or {})


def test_no_model_before_the_first_version_then_it_loads(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    server = make_server(settings)
    with pytest.raises(NoModelLoaded, match="no model version exists yet"):
        segment(server)
    state = server.status()
    assert not state.ready and state.active_version is None and state.serving_version is None

    registry.activate(publish(registry, template))  # noticed by the pointer poll (embedded mode)
    assert server.wait_until_serving("v1", timeout=30)
    assert segment(server) == "v1"
    with server.lease() as runtime:
        assert runtime.backend == resolve_backend("auto")
        if runtime.backend == "ort-cpu":
            assert runtime.threads == settings.ort_threads == 1
    state = server.status()
    assert state.ready and state.active_version == state.serving_version == "v1" and state.swaps == 1
    assert _metric("incseg_active_model_version", {"version": "v1"}) == 1.0


def test_swap_under_concurrent_clients_switches_once_and_never_back(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    old = publish(registry, template)
    new = publish(registry, template)
    registry.activate(old)
    loader = RecordingLoader(settings, held=new)  # a slow load (Triton's creation_delay_sec), on cue
    server = make_server(settings, loader)
    assert server.wait_until_serving(old, timeout=30)
    swaps_before = _metric("incseg_model_swaps_total") or 0.0

    answers: list[list[str]] = [[] for _ in range(4)]
    errors: list[str] = []
    answered_while_loading = [threading.Event() for _ in answers]
    stop = threading.Event()

    def client(seen: list[str], while_loading: threading.Event) -> None:
        while not stop.is_set():
            try:
                began_during_the_load = server.status().loading == new
                seen.append(segment(server))
                if began_during_the_load and server.status().loading == new:  # answered by the old version
                    while_loading.set()
            except Exception as error:
                errors.append(repr(error))

    clients = [
        threading.Thread(target=client, args=(seen, while_loading))
        for seen, while_loading in zip(answers, answered_while_loading, strict=True)
    ]
    for thread in clients:
        thread.start()
    wait_for(lambda: all(len(seen) >= 3 for seen in answers), 30, "steady answers from the old version")
    activated_at = time.time()
    registry.activate(new)
    assert loader.entered.wait(WAIT_S), "the new version's load never started"
    held_from = time.monotonic()
    for while_loading in answered_while_loading:  # the old version keeps answering during the load
        assert while_loading.wait(WAIT_S), "a client got no answer while the new version loaded"
    held_s = time.monotonic() - held_from
    loader.release.set()
    assert server.wait_until_serving(new, timeout=30)
    serving_after_s = time.time() - activated_at
    wait_for(lambda: all(seen[-1] == new for seen in answers), 30, "every client answered by the new version")
    count = [len(seen) for seen in answers]
    wait_for(
        lambda: all(len(seen) >= n + 3 for seen, n in zip(answers, count, strict=True)), 30, "more answers"
    )
    stop.set()
    for thread in clients:
        thread.join(30)

    assert errors == []
    for seen in answers:
        switch = seen.index(new)
        assert switch > 0 and set(seen[:switch]) == {old} and set(seen[switch:]) == {new}
    state = server.status()
    assert state.swaps == 2 and state.swap_failures == 0 and state.failures == {}
    assert state.last_swap["version"] == new and state.last_swap["previous"] == old
    assert state.last_swap["load_s"] >= held_s and state.last_swap["warmup_s"] > 0
    assert 0 <= state.last_swap["notice_s"] <= serving_after_s  # noticed between activation and swap
    assert _metric("incseg_model_swaps_total") == swaps_before + 1
    assert _metric("incseg_active_model_version", {"version": new}) == 1.0
    assert _metric("incseg_active_model_version", {"version": old}) is None
    (old_runtime,) = loader.opened[old]
    assert isinstance(old_runtime, OrtRuntime)
    assert old_runtime.closed and old_runtime.session is None  # closed after its last lease


@pytest.mark.parametrize(("damage", "error"), [(truncate_onnx, "sha256"), (wrong_input_size, "images")])
def test_a_broken_version_keeps_the_old_one_serving(
    settings: Settings, registry: Registry, template: Path, make_server, damage, error: str
) -> None:
    good = publish(registry, template)
    broken = publish(registry, template, damage)
    registry.activate(good)
    server = make_server(settings.model_copy(update={"model_retry_s": 600.0, "model_retry_max_s": 600.0}))
    assert server.wait_until_serving(good, timeout=30)
    failures_before = _metric("incseg_model_swap_failures_total") or 0.0

    registry.activate(broken)
    server.request_version(broken)  # as the activate route does; the poll reports the same activation
    wait_for(lambda: broken in server.status().failures, 30, "the broken version's failure")
    settle(server)  # the poll has reported the same activation: not tried again
    state = server.status()
    assert state.serving_version == good and state.active_version == broken and state.ready
    assert error in state.failures[broken] and state.swap_failures == 1 and state.loading is None
    assert segment(server) == good
    assert _metric("incseg_model_swap_failures_total") == failures_before + 1

    registry.activate(broken)  # activating it again is a new activation: tried again
    wait_for(lambda: server.status().swap_failures == 2, 30, "the second attempt")
    assert server.status().serving_version == good

    registry.activate(good)  # moving the pointer back is a no-op: good is serving
    settle(server)
    assert server.status().swaps == 1 and segment(server) == good


def test_a_version_that_failed_parity_cannot_be_activated(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    good = publish(registry, template)
    unchecked = publish(registry, template, failed_parity)
    registry.activate(good)
    server = make_server(settings)
    assert server.wait_until_serving(good, timeout=30)
    with pytest.raises(ValueError, match="parity"):
        registry.activate(unchecked)
    settle(server)
    state = server.status()
    assert state.active_version == state.serving_version == good and state.failures == {}


def test_rollback_by_activating_an_older_version(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    first = publish(registry, template)
    second = publish(registry, template)
    registry.activate(first)
    server = make_server(settings)
    assert server.wait_until_serving(first, timeout=30)
    registry.activate(second)
    assert server.wait_until_serving(second, timeout=30)
    registry.activate(first)  # the rollback
    assert server.wait_until_serving(first, timeout=30)
    assert segment(server) == first
    state = server.status()
    assert state.swaps == 3 and state.last_swap["previous"] == second


def test_a_late_request_for_an_older_version_does_not_roll_back(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    older = publish(registry, template)
    newer = publish(registry, template)
    registry.activate(newer)
    loader = RecordingLoader(settings)
    server = make_server(settings, loader)
    assert server.wait_until_serving(newer, timeout=30)

    server.request_version(older)  # e.g. a delayed announcement of an earlier activation
    wait_for(lambda: older in loader.opened and server.status().loading is None, 30, "the late load")
    state = server.status()
    assert state.serving_version == newer and state.swaps == 1 and state.failures == {}
    assert segment(server) == newer
    assert all(runtime.closed for runtime in loader.opened[older])  # loaded, then discarded


def test_pointer_moving_during_a_slow_load_wins(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    first, second, third = (publish(registry, template) for _ in range(3))
    registry.activate(first)
    loader = RecordingLoader(settings, held=second)
    server = make_server(settings, loader)
    assert server.wait_until_serving(first, timeout=30)
    registry.activate(second)
    assert loader.entered.wait(WAIT_S), "the second version's load never started"
    registry.activate(third)  # while the second one is still loading
    loader.release.set()
    assert server.wait_until_serving(third, timeout=30)
    state = server.status()
    assert state.swaps == 2 and state.last_swap["previous"] == first  # second never served
    assert all(runtime.closed for runtime in loader.opened[second])


def test_stop_closes_the_runtime_after_the_last_lease(
    settings: Settings, registry: Registry, template: Path
) -> None:
    registry.activate(publish(registry, template))
    loader = RecordingLoader(settings)
    server = ModelServer(settings, registry, loader)
    server.start()
    assert server.wait_until_serving(timeout=30)
    with server.lease() as runtime:
        server.stop()
        assert not runtime.closed  # a request in flight keeps it open
        assert runtime.predict([IMAGE])[0].shape == IMAGE.shape[:2]
        with pytest.raises(NoModelLoaded, match="stopped"):
            segment(server)
    assert runtime.closed
    server.start()  # a restarted server loads the active version again
    try:
        assert server.wait_until_serving(timeout=30) and segment(server) == "v1"
    finally:
        server.stop()


@pytest.mark.parametrize("use_redis", [True, False], ids=["redis", "poll-only"])
def test_notice_time_with_and_without_the_announcement(
    settings: Settings, redis_settings: Settings, registry: Registry, template: Path, make_server, use_redis
) -> None:
    # with Redis the poll is an hour away, so the swap can only come from the announcement
    never_polled = redis_settings.model_copy(update={"poll_interval_s": NEVER_S})
    active_settings = never_polled if use_redis else settings
    first = publish(registry, template)
    second = publish(registry, template)
    registry.activate(first)
    server = make_server(active_settings)
    assert server.wait_until_serving(first, timeout=30)
    if use_redis:
        assert server._watcher.subscribed.wait(WAIT_S)
        assert server._watcher.wait_for_checks(2, WAIT_S)  # the read at start, then the listener's catch-up

    activated_at = time.time()
    registry.activate(second)
    announce_active(active_settings, second)
    assert server.wait_until_serving(second, timeout=30)
    serving_after_s = time.time() - activated_at
    swap = server.status().last_swap
    print(f"\nnotice {swap['notice_s']:.3f} s, load {swap['load_s']:.3f} s, warm-up {swap['warmup_s']:.3f} s")
    assert 0 <= swap["notice_s"] <= serving_after_s  # measured from the activation to the notice


def retry_settings(settings: Settings, **update: float) -> Settings:
    return settings.model_copy(update={"model_retry_s": 0.2, "model_retry_max_s": 0.5, **update})


def test_a_failed_load_of_the_active_version_is_retried_with_capped_backoff(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    fast = retry_settings(settings)
    good = publish(registry, template)
    flaky = publish(registry, template)
    registry.activate(good)
    loader = FlakyLoader(fast, flaky, failures=4)
    server = make_server(fast, loader)
    assert server.wait_until_serving(good, timeout=30)
    retries_before = _metric("incseg_model_load_retries_total") or 0.0
    failures_before = _metric("incseg_model_swap_failures_total") or 0.0
    answers: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(segment(server))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        registry.activate(flaky)
        server.request_version(flaky)
        assert server.wait_until_serving(flaky, timeout=60)  # attempt 5 succeeds
        count = len(answers)
        wait_for(lambda: len(answers) >= count + 3, 30, "answers after the swap")
    finally:
        stop.set()
        thread.join(30)

    switch = answers.index(flaky)
    assert switch > 0 and set(answers[:switch]) == {good} and set(answers[switch:]) == {flaky}
    state = server.status()
    assert state.retry is None and state.failures == {} and state.load_retries == 4
    assert state.swap_failures == 4 and state.swaps == 2
    gaps = [later - earlier for earlier, later in zip(loader.attempts, loader.attempts[1:], strict=False)]
    print(f"\nretry gaps {[round(gap, 3) for gap in gaps]} s (backoff 0.2, 0.4, 0.5, 0.5)")
    assert len(loader.attempts) == 5
    for gap, backoff in zip(gaps, (0.2, 0.4, 0.5, 0.5), strict=True):  # never sooner than the backoff
        assert gap >= backoff
    assert _metric("incseg_model_load_retries_total") == retries_before + 4
    assert _metric("incseg_model_swap_failures_total") == failures_before + 4


def test_a_version_that_keeps_failing_keeps_the_old_one_serving_until_another_is_activated(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    fast = retry_settings(settings, model_retry_s=0.05, model_retry_max_s=0.1)
    good, broken, third = (publish(registry, template) for _ in range(3))
    registry.activate(good)
    loader = FlakyLoader(fast, broken, failures=1_000_000)
    server = make_server(fast, loader)
    assert server.wait_until_serving(good, timeout=30)

    registry.activate(broken)
    server.request_version(broken)
    wait_for(lambda: len(loader.attempts) >= 6, 30, "six attempts")
    state = server.status()
    assert state.serving_version == good and state.ready and segment(server) == good
    assert state.load_retries >= 5 and broken in state.failures

    registry.activate(good)  # the rollback ends the retries
    server.request_version(good)
    assert server.status().retry is None
    assert server.wait_until_settled(WAIT_S)  # an attempt in flight at the rollback has ended
    attempts = len(loader.attempts)
    registry.activate(third)
    server.request_version(third)
    assert server.wait_until_serving(third, timeout=30)
    assert len(loader.attempts) == attempts and server.status().retry is None


def test_a_request_while_the_first_version_loads_waits_for_it(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    version = publish(registry, template)
    loader = BlockingLoader(settings, version)
    server = make_server(settings, loader)
    registry.activate(version)  # noticed by the request itself, before the pointer poll
    answers: list[str] = []
    errors: list[BaseException] = []

    def request() -> None:
        try:
            answers.append(segment(server))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=request)
    thread.start()
    assert loader.entered.wait(30), "the load never started"
    assert server.status().loading == version and not server.status().ready
    loader.release.set()
    thread.join(60)
    assert errors == [] and answers == [version]


def test_the_wait_for_a_loading_version_is_bounded(
    settings: Settings, registry: Registry, template: Path, make_server
) -> None:
    version = publish(registry, template)
    registry.activate(version)
    loader = BlockingLoader(settings, version)
    server = make_server(settings.model_copy(update={"model_wait_s": 0.2}), loader)
    assert loader.entered.wait(30), "the load never started"
    with pytest.raises(NoModelLoaded, match=f"{version} is loading and warming up") as refused:
        segment(server)
    assert refused.value.retry_after_s == 1
    loader.release.set()
    assert server.wait_until_serving(version, timeout=30) and segment(server) == version


def test_no_version_at_all_is_refused_at_once_without_retry_after(settings: Settings, make_server) -> None:
    server = make_server(settings)  # model_wait_s 30: the refusal must not wait for it
    started = time.monotonic()
    with pytest.raises(NoModelLoaded, match="no model version exists yet") as refused:
        segment(server)
    assert refused.value.retry_after_s is None and time.monotonic() - started < settings.model_wait_s
