"""Who holds a running task: a process identity that survives PID reuse, and whether it is alive.

A holder is ``host:start:pid``; its liveness is known only on its own host (elsewhere the task table's
heartbeat decides, :meth:`service.db.TaskStore.claim`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def worker_id() -> str:
    """Identity of this process as a task holder: ``host:start:pid``.

    ``start`` is the process's start time (``/proc``, clock ticks since boot; empty where there is no
    ``/proc``): a worker container restarted with the same hostname gets a fresh PID namespace, and its
    new pool process often has the PID of the old one, which a bare ``host:pid`` would take as alive.
    Ticks since boot are immune to clock changes; a wall-clock start time (``psutil.Process.create_time``,
    boot time plus ticks) moves when NTP sets the clock (a Jetson without a real-time clock at boot), and
    a live holder would then read as dead.
    """
    return f"{socket.gethostname()}:{_start_time(os.getpid()) or ''}:{os.getpid()}"


def holder_alive(holder: str | None) -> bool | None:
    """Whether the process named ``host:start:pid`` (or ``host:pid``) is alive: known only on its host.

    None on another host. A process with that PID but another start time is a different process (the
    PID was reused): the holder is dead. A zombie (exited, not yet reaped: a pool process whose worker was
    SIGKILLed with it waits for init to reap it, which can take seconds on a loaded machine) is dead.
    """
    if not holder or ":" not in holder:
        return None
    rest, _, pid = holder.rpartition(":")
    host, sep, start = rest.rpartition(":")
    if not sep:
        host, start = rest, ""
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start and _start_time(int(pid)) not in (None, start):
        return False
    return not _exited(int(pid))


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` from the state on (field 3), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()  # the command name in parentheses may hold spaces


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/PID/stat``), or None."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _exited(pid: int) -> bool:
    """Whether ``/proc`` shows the process as a zombie or dead (False where there is no ``/proc``)."""
    fields = _stat_fields(pid) or []
    return len(fields) > 0 and fields[0] in ("Z", "X")
