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
NEVER_S = 3600.0  # a poll interval no test outlives: only a Redis message can wake the watcher
WAIT_S = 30.0  # how long a test waits for something that must happen (it happens in well under 1 s)


class Changes:
    """Records on_change calls in order."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._reported = threading.Condition()

    def __call__(self, name: str) -> None:
        with self._reported:
            self.names.append(name)
            self._reported.notify_all()

    def wait_for(self, name: str, times: int = 1) -> None:
        """Blocks until ``name`` was reported ``times`` times (fails after ``WAIT_S``)."""
        with self._reported:
            reported = self._reported.wait_for(lambda: self.names.count(name) >= times, WAIT_S)
        assert reported, f"{name} not reported {times} time(s) within {WAIT_S} s (got {self.names})"


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


def _wait_for_more_checks(watcher: ActiveWatcher, more: int) -> None:
    """Blocks until the watcher has read the pointer ``more`` more times (the witness that it looked)."""
    assert watcher.wait_for_checks(watcher.checks + more, WAIT_S), f"{more} more checks within {WAIT_S} s"


def _wait_for_listener(watcher: ActiveWatcher) -> None:
    """Blocks until the listener is subscribed and has read the pointer after subscribing.

    With the poll an hour away, a later report can then only come from a message on the channel.
    """
    assert watcher.subscribed.wait(WAIT_S)
    assert watcher.wait_for_checks(2, WAIT_S)  # the read at start, then the listener's catch-up read


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
    watcher, changes = _watch(settings.model_copy(update={"poll_interval_s": 0.05}), registry)
    try:
        assert changes.names == [names[0]]  # reported at start
        registry.activate(names[1])  # embedded mode: only the poll can notice it
        changes.wait_for(names[1])
        _wait_for_more_checks(watcher, 3)  # three polls of an unchanged pointer
        assert changes.names == names[:2]
        registry.activate(names[0])  # a rollback is a change like any other
        changes.wait_for(names[0], times=2)
        registry.activate(names[0])  # so is activating the active version again (a retry)
        changes.wait_for(names[0], times=3)
        _wait_for_more_checks(watcher, 3)
        assert changes.names == [names[0], names[1], names[0], names[0]]
    finally:
        watcher.stop()


def test_announcement_is_noticed_well_before_the_poll(
    redis_settings: Settings, registry: Registry, versions
) -> None:
    names = versions[1]
    watcher, changes = _watch(redis_settings.model_copy(update={"poll_interval_s": NEVER_S}), registry)
    try:
        _wait_for_listener(watcher)
        checks = watcher.checks
        started = time.monotonic()
        registry.activate(names[2])
        announce_active(redis_settings, names[2])
        changes.wait_for(names[2])  # the poll is an hour away: the message woke the listener
        print(f"\nnotice through Redis: {1000 * (time.monotonic() - started):.1f} ms")
        assert changes.names == [names[0], names[2]] and watcher.checks == checks + 1  # one message, one read
    finally:
        watcher.stop()


def test_a_stale_announcement_reports_the_pointer_not_the_message(
    redis_settings: Settings, registry: Registry, versions
) -> None:
    names = versions[1]
    watcher, changes = _watch(redis_settings.model_copy(update={"poll_interval_s": NEVER_S}), registry)
    try:
        _wait_for_listener(watcher)
        registry.activate(names[1])
        announce_active(redis_settings, names[2])  # names a version the pointer does not
        changes.wait_for(names[1])
        checks = watcher.checks
        announce_active(redis_settings, names[0])  # a late announcement of an older activation
        assert watcher.wait_for_checks(checks + 1, WAIT_S), "the late announcement was not read"
        assert changes.names == [names[0], names[1]]
    finally:
        watcher.stop()


def test_redis_down_keeps_the_thread_alive_and_polling_works(
    settings: Settings, registry: Registry, versions
) -> None:
    names = versions[1]
    down = settings.model_copy(update={"redis_url": CLOSED_PORT_URL, "poll_interval_s": 0.05})
    watcher, changes = _watch(down, registry)
    try:
        deadline = time.monotonic() + WAIT_S
        while watcher.redis_errors < 2:
            assert time.monotonic() < deadline, "the listener did not retry"
            time.sleep(0.05)
        assert not watcher.subscribed.is_set()
        registry.activate(names[1])
        changes.wait_for(names[1])
        assert all(thread.is_alive() for thread in watcher._threads)
    finally:
        watcher.stop()
    assert watcher._threads == []


def test_listener_recovers_after_its_connection_is_killed(
    redis_settings: Settings, registry: Registry, versions
) -> None:
    names = versions[1]
    watcher, changes = _watch(redis_settings.model_copy(update={"poll_interval_s": NEVER_S}), registry)
    try:
        _wait_for_listener(watcher)
        checks = watcher.checks
        assert redis_settings.redis_url is not None
        with redis.Redis.from_url(redis_settings.redis_url) as admin:
            mine = [
                c for c in admin.client_list() if c["name"] == f"{redis_settings.instance}-active-watcher"
            ]
            assert len(mine) == 1
            admin.client_kill_filter(_id=mine[0]["id"])
        deadline = time.monotonic() + WAIT_S
        while watcher.redis_errors < 1:  # set after `subscribed` is cleared: the next set is the new one
            assert time.monotonic() < deadline, "the listener did not notice the kill"
            time.sleep(0.05)
        assert watcher.subscribed.wait(WAIT_S), "the listener did not subscribe again"
        assert watcher.wait_for_checks(checks + 1, WAIT_S)  # its catch-up read on the new connection
        registry.activate(names[2])
        announce_active(redis_settings, names[2])
        changes.wait_for(names[2])  # pub/sub again: the poll is an hour away
        assert changes.names == [names[0], names[2]]
    finally:
        watcher.stop()
