"""announce_active and ActiveWatcher against the real Redis: pointer poll, pub/sub, stale messages, Redis
errors and a killed subscription."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from service.announce import ActiveWatcher, announce_active
from service.registry import EXPORT_SUBDIR, MANIFEST_JSON, MODEL_JSON, MODEL_SUBDIR, Registry
from service.settings import Settings

CLOSED_PORT_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1


class Changes:
    """Records on_change calls with their time."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.times: list[float] = []
        self.event = threading.Event()

    def __call__(self, name: str) -> None:
        self.names.append(name)
        self.times.append(time.monotonic())
        self.event.set()

    def wait_for(self, name: str, timeout: float, times: int = 1) -> float:
        """When ``name`` was reported for the ``times``-th time (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.names.count(name) < times:
            assert time.monotonic() < deadline, f"{name} not reported within {timeout} s (got {self.names})"
            time.sleep(0.005)
        return [when for seen, when in zip(self.names, self.times, strict=True) if seen == name][times - 1]


def _publish_placeholder(registry: Registry) -> str:
    """A version with just the files the registry reads to publish and activate it (the watcher only
    follows the pointer; nothing loads these models)."""
    with registry.staging() as stage:
        (stage / MODEL_SUBDIR).mkdir()
        (stage / MODEL_SUBDIR / MODEL_JSON).write_text(json.dumps({"classes": ["background"], "history": []}))
        (stage / EXPORT_SUBDIR).mkdir()
        (stage / EXPORT_SUBDIR / MANIFEST_JSON).write_text(json.dumps({"parity": {"passed": True}}))
        return registry.publish(stage, metrics=None, task_id=None, base_version=None, engine="not built").name


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, list[str]]:
    """A registry with three activatable versions."""
    registry = Registry(tmp_path_factory.mktemp("announce") / "registry")
    return registry, [_publish_placeholder(registry) for _ in range(3)]


@pytest.fixture
def registry(versions: tuple[Registry, list[str]]) -> Registry:
    registry, names = versions
    registry.activate(names[0])
    return registry


def _watch(settings: Settings, registry: Registry) -> tuple[ActiveWatcher, Changes]:
    changes = Changes()
    watcher = ActiveWatcher(settings, registry, changes)
    watcher.start()
    return watcher, changes


def test_announce_publishes_the_version_on_the_instance_channel(redis_settings: Settings) -> None:
    assert redis_settings.redis_url is not None
    with redis.Redis.from_url(redis_settings.redis_url) as client, client.pubsub() as pubsub:
        pubsub.subscribe(f"{redis_settings.instance}:active")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        before = time.time()
        announce_active(redis_settings, "v7")
        message = pubsub.get_message(timeout=5)
    body = json.loads(message["data"])
    assert message["channel"].decode() == f"{redis_settings.instance}:active"
    assert body["version"] == "v7" and before <= body["announced_at"] <= time.time()


def test_announce_without_redis_or_with_redis_down_does_not_raise(settings: Settings, caplog) -> None:
    announce_active(settings, "v1")  # embedded mode: nothing to do
    down = settings.model_copy(update={"redis_url": CLOSED_PORT_URL})
    started = time.monotonic()
    announce_active(down, "v1")
    assert time.monotonic() - started < 5
    assert "could not announce v1" in caplog.text


def test_poll_reports_the_pointer_once_per_change(settings: Settings, registry: Registry, versions) -> None:
    names = versions[1]
    watcher, changes = _watch(settings.model_copy(update={"poll_interval_s": 0.1}), registry)
    try:
        assert changes.names == [names[0]]  # reported at start
        started = time.monotonic()
        registry.activate(names[1])
        assert changes.wait_for(names[1], 5) - started < 1.0
        time.sleep(0.5)  # several polls of an unchanged pointer
        assert changes.names == names[:2]
        registry.activate(names[0])  # a rollback is a change like any other
        changes.wait_for(names[0], 5, times=2)
        registry.activate(names[0])  # so is activating the active version again (a retry)
        changes.wait_for(names[0], 5, times=3)
        time.sleep(0.3)
        assert changes.names == [names[0], names[1], names[0], names[0]]
    finally:
        watcher.stop()


def test_announcement_is_noticed_well_before_the_poll(
    redis_settings: Settings, registry: Registry, versions
) -> None:
    names = versions[1]
    watcher, changes = _watch(redis_settings.model_copy(update={"poll_interval_s": 30.0}), registry)
    try:
        assert watcher.subscribed.wait(10)
        started = time.monotonic()
        registry.activate(names[2])
        announce_active(redis_settings, names[2])
        notice = changes.wait_for(names[2], 5) - started
        print(f"\nnotice through Redis: {1000 * notice:.1f} ms")
        assert notice < 0.5
    finally:
        watcher.stop()


def test_a_stale_announcement_reports_the_pointer_not_the_message(
    redis_settings: Settings, registry: Registry, versions
) -> None:
    names = versions[1]
    watcher, changes = _watch(redis_settings.model_copy(update={"poll_interval_s": 30.0}), registry)
    try:
        assert watcher.subscribed.wait(10)
        registry.activate(names[1])
        announce_active(redis_settings, names[2])  # names a version the pointer does not
        changes.wait_for(names[1], 5)
        announce_active(redis_settings, names[0])  # a late announcement of an older activation
        time.sleep(0.5)
        assert changes.names == [names[0], names[1]]
    finally:
        watcher.stop()


def test_redis_down_keeps_the_thread_alive_and_polling_works(
    settings: Settings, registry: Registry, versions
) -> None:
    names = versions[1]
    down = settings.model_copy(update={"redis_url": CLOSED_PORT_URL, "poll_interval_s": 0.1})
    watcher, changes = _watch(down, registry)
    try:
        deadline = time.monotonic() + 10
        while watcher.redis_errors < 2:
            assert time.monotonic() < deadline, "the listener did not retry"
            time.sleep(0.05)
        assert not watcher.subscribed.is_set()
        registry.activate(names[1])
        changes.wait_for(names[1], 5)
        assert all(thread.is_alive() for thread in watcher._threads)
    finally:
        watcher.stop()
    assert watcher._threads == []


def test_listener_recovers_after_its_connection_is_killed(
    redis_settings: Settings, registry: Registry, versions
) -> None:
    names = versions[1]
    watcher, changes = _watch(redis_settings.model_copy(update={"poll_interval_s": 30.0}), registry)
    try:
        assert watcher.subscribed.wait(10)
        assert redis_settings.redis_url is not None
        with redis.Redis.from_url(redis_settings.redis_url) as admin:
            mine = [
                c for c in admin.client_list() if c["name"] == f"{redis_settings.instance}-active-watcher"
            ]
            assert len(mine) == 1
            admin.client_kill_filter(_id=mine[0]["id"])
            deadline = time.monotonic() + 10
            while not any(
                c["name"] == f"{redis_settings.instance}-active-watcher" and c["id"] != mine[0]["id"]
                for c in admin.client_list()
            ):
                assert time.monotonic() < deadline, "the listener did not reconnect"
                time.sleep(0.05)
        time.sleep(0.3)  # let the new connection subscribe
        started = time.monotonic()
        registry.activate(names[2])
        announce_active(redis_settings, names[2])
        assert changes.wait_for(names[2], 5) - started < 1.0  # pub/sub again, not the 30 s poll
    finally:
        watcher.stop()
