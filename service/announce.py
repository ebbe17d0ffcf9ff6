"""Announcing and noticing a new active model version.

The registry's pointer file (``REGISTRY/ACTIVE``) is the truth; an announcement on the Redis channel
``INSTANCE:active`` only shortens the time until API processes notice it. :class:`ActiveWatcher` polls the
pointer every ``poll_interval_s`` (always: the fallback when Redis is down and the only path in embedded
mode) and, when Redis is configured, listens on the channel too. Whatever woke it, it re-reads the pointer
and reports the name found there, never the name carried by a message: an announcement that arrives late
(after a newer activation) cannot roll a process back. Every activation is reported once, including a
repeated activation of the same version: ``Registry.activate`` writes a new pointer file each time, and
the file's identity (:func:`read_pointer`) tells activations apart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from service.registry import ACTIVE_FILE, Registry
from service.settings import Settings

logger = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
LISTEN_TICK_S = 0.25


@dataclass(frozen=True)
class Pointer:
    """What the registry's pointer file said when read.

    Attributes:
        version: The active version's name.
        activation: ``(st_mtime_ns, st_ino)`` of the pointer file: a new value for every activation.
    """

    version: str
    activation: tuple[int, int]

    @property
    def activated_at(self) -> float:
        """When the pointer was written (Unix time)."""
        return self.activation[0] / 1e9


def read_pointer(registry: Registry) -> Pointer | None:
    """Reads the active version and the pointer file's identity from one open file (None before any).

    Raises:
        OSError: The pointer exists but cannot be read.
    """
    try:
        with open(registry.root / ACTIVE_FILE, encoding="utf-8") as handle:
            stat = os.fstat(handle.fileno())
            name = handle.read().strip()
    except FileNotFoundError:
        return None
    return Pointer(name, (stat.st_mtime_ns, stat.st_ino)) if name else None


def announce_active(settings: Settings, version: str) -> None:
    """Publishes ``{"version", "announced_at"}`` on ``settings.active_channel`` when Redis is configured.

    Call it after :meth:`Registry.activate`. A failure to publish is logged, not raised: the activation has
    happened, and every API process still notices it by polling within ``poll_interval_s``.
    """
    if settings.redis_url is None:
        return
    message = json.dumps({"version": version, "announced_at": time.time()})
    try:
        with redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2) as client:
            receivers = client.publish(settings.active_channel, message)
    except redis.RedisError as error:
        logger.warning(
            "could not announce %s on %s (%s); pollers will notice it",
            version,
            settings.active_channel,
            error,
        )
        return
    logger.info("announced %s on %s (%d listeners)", version, settings.active_channel, receivers)


class ActiveWatcher:
    """Calls ``on_change(name)`` for every activation (a new pointer file), with the name it names.

    Args:
        settings: ``poll_interval_s``, ``redis_url`` and ``active_channel`` are used.
        registry: The registry whose pointer is watched.
        on_change: Called with the new active name, from a watcher thread, one call at a time and in the
            order the pointer changed; it should return quickly (hand the work to another thread).

    Attributes:
        subscribed: Set while the Redis subscription is live (tests wait on it).
        redis_errors: Redis errors survived so far (the listener reconnects after each).
    """

    def __init__(self, settings: Settings, registry: Registry, on_change: Callable[[str], None]) -> None:
        self._settings = settings
        self._registry = registry
        self._on_change = on_change
        self._reported: Pointer | None = None
        self._checked = threading.Condition()  # held while reporting, so reports stay in pointer order
        self._checks = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.subscribed = threading.Event()
        self.redis_errors = 0

    def start(self) -> None:
        """Reports the current pointer (if any) at once, then starts the poller and the Redis listener."""
        self._stop.clear()
        with self._checked:
            self._reported = None  # a restarted watcher reports the pointer again
        self.check()
        self._threads = [threading.Thread(target=self._poll, name="incseg-active-poll", daemon=True)]
        redis_url = self._settings.redis_url
        if redis_url is not None:
            listener = threading.Thread(
                target=self._listen, args=(redis_url,), name="incseg-active-redis", daemon=True
            )
            self._threads.append(listener)
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops both threads (waits up to ``timeout`` for each)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        self.subscribed.clear()

    @property
    def checks(self) -> int:
        """Pointer reads finished so far, each with its report (if it found a new activation) made."""
        with self._checked:
            return self._checks

    def wait_for_checks(self, count: int, timeout: float) -> bool:
        """Blocks until :attr:`checks` reaches ``count``; False after ``timeout`` seconds.

        A finished read is the witness that whatever preceded it (an activation, a message) was seen: a
        caller can wait for one instead of sleeping through a poll interval.
        """
        with self._checked:
            return self._checked.wait_for(lambda: self._checks >= count, timeout)

    def check(self) -> Pointer | None:
        """Reads the pointer and reports it when it is a new activation; returns what it read."""
        try:
            pointer = read_pointer(self._registry)
        except OSError as error:  # a volume hiccup: the next poll tries again
            logger.warning("cannot read the active version pointer: %s", error)
            pointer = None
        with self._checked:
            if pointer is not None and pointer != self._reported:
                self._reported = pointer
                try:
                    self._on_change(pointer.version)
                except Exception:
                    logger.exception("handling the activation of %s failed", pointer.version)
            self._checks += 1
            self._checked.notify_all()
        return pointer

    def _poll(self) -> None:
        while not self._stop.wait(self._settings.poll_interval_s):
            self.check()

    def _listen(self, redis_url: str) -> None:
        """Subscribes to the channel and re-reads the pointer on every message; reconnects on errors."""
        delay = RECONNECT_MIN_S
        while not self._stop.is_set():
            client = redis.Redis.from_url(
                redis_url,
                socket_connect_timeout=2,
                health_check_interval=10,
                client_name=f"{self._settings.instance}-active-watcher",
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._settings.active_channel)
                self.subscribed.set()
                self.check()  # catch up on an activation announced while we were not listening
                delay = RECONNECT_MIN_S
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=LISTEN_TICK_S) is not None:
                        self.check()
            except (redis.RedisError, OSError) as error:
                self.subscribed.clear()
                self.redis_errors += 1
                logger.warning(
                    "Redis listener on %s: %s; reconnecting in %.1f s",
                    self._settings.active_channel,
                    error,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
            finally:
                pubsub.close()
                client.close()
