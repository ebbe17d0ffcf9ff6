"""The API key of a process listening beyond loopback: the configured one, or one kept in the data directory.

A process that accepts connections from other machines (``--host 0.0.0.0``, a container's port) without
``INCSEG_API_KEY`` would let anyone who reaches the port post tasks, cancel them and roll the model back.
:func:`secure_settings` gives such a process a key instead: the one in ``DATA_DIR/api-key``, created on
first use with a random value (mode 0600, published atomically so that API replicas sharing the volume
all read the same complete key) and printed once. ``INCSEG_ALLOW_UNAUTHENTICATED=true`` opts out.

This module imports neither FastAPI nor the training stack: the CLI's client reads the key file too.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr

from service.settings import Settings

logger = logging.getLogger(__name__)

KEY_FILE_NAME = "api-key"
KEY_FILE_MODE = 0o600
KEY_BYTES = 32  # 256 random bits, 43 URL-safe characters
MAX_KEY_FILE_BYTES = 4096


class KeyFileError(ValueError):
    """The key file exists but holds no usable key; the message says how to fix it."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name to listen on or connect to) stays on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def key_file(data_dir: Path) -> Path:
    """The key file of the service whose data directory is ``data_dir``."""
    return data_dir / KEY_FILE_NAME


def read_key_file(path: Path) -> str:
    """The key in ``path`` (surrounding whitespace removed).

    Raises:
        KeyFileError: The file is empty, too large or not text.
        OSError: The file cannot be read.
    """
    with path.open("rb") as file:
        data = file.read(MAX_KEY_FILE_BYTES + 1)
    try:
        key = data.decode("ascii").strip()
    except UnicodeDecodeError:
        key = ""
    if not key or len(data) > MAX_KEY_FILE_BYTES or any(char.isspace() for char in key):
        raise KeyFileError(
            f"{path} holds no usable API key (one line of at most {MAX_KEY_FILE_BYTES} ASCII characters "
            "without spaces): delete it to have a new key generated, or write a key in it"
        )
    return key


def load_or_create_key(path: Path) -> tuple[str, bool]:
    """The key in ``path``, created with a random value if the file does not exist.

    The new key is written and synced to a private temporary file that is then hard-linked to ``path``:
    the link fails if ``path`` exists (like ``O_EXCL``), so of several processes starting at once exactly
    one creates the file, and no process ever reads it half written.

    Returns:
        The key, and whether this call created the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return read_key_file(path), False
    key = secrets.token_urlsafe(KEY_BYTES)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{key}\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return read_key_file(path), False
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return key, True


def secure_settings(settings: Settings, host: str) -> Settings:
    """``settings`` for a process listening on ``host``, with a key whenever it listens beyond loopback.

    On loopback, with ``api_key`` set, or with ``allow_unauthenticated`` the settings are returned as they
    are (the last with a warning in the log). Otherwise the key of :func:`load_or_create_key` becomes
    ``api_key``; a new key is printed once, with the file that keeps it.

    Raises:
        KeyFileError: The key file exists but holds no usable key.
    """
    if is_loopback(host) or settings.api_key is not None:
        return settings
    if settings.allow_unauthenticated:
        logger.warning(
            "listening on %s without an API key (INCSEG_ALLOW_UNAUTHENTICATED=true): anyone who reaches "
            "the port can post and cancel tasks, roll the model back and read every task",
            host,
        )
        return settings
    path = key_file(settings.data_dir)
    key, created = load_or_create_key(path)
    if created:
        print(
            f"incseg: listening on {host} needs an API key; generated one and saved it in {path.resolve()} "
            f"(mode 600). Send it in the X-API-Key header:\n    {key}",
            flush=True,
        )
    else:
        print(f"incseg: listening on {host}; the API key is the one in {path.resolve()}", flush=True)
    return settings.model_copy(update={"api_key": SecretStr(key)})


def local_api_key(url: str, data_dir: Path) -> str | None:
    """The key in ``data_dir``'s key file when ``url`` points at this machine, else None.

    A client started on the service's own machine and data directory needs no ``--api-key``; the key is
    never sent to another host.
    """
    host = urlsplit(url).hostname
    path = key_file(data_dir)
    if host is None or not is_loopback(host) or not path.is_file():
        return None
    return read_key_file(path)
