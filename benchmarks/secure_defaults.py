"""The secure defaults on real ``incseg api`` processes, as a hostile client and a hostile web page see them.

First ``incseg api --host 0.0.0.0`` without ``INCSEG_API_KEY``: the seconds until ``/health`` answers, the
key file's mode and length, how often the key was printed, and the answer to each protected route without
and with the key. Then the same data directory served key-free on 127.0.0.1: a mutation as curl sends it,
from a page on another site, from the service's own docs page, and through a proxy.

    .venv/bin/python benchmarks/secure_defaults.py
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.api_key import key_file

INCSEG = Path(sys.executable).with_name("incseg")
PROTECTED = [
    ("POST", "/models/v1/activate"),
    ("DELETE", "/tasks/x"),
    ("GET", "/tasks"),
    ("GET", "/models"),
    ("GET", "/classes"),
    ("POST", "/segment"),
]
PUBLIC = ["/health", "/ready", "/metrics", "/docs"]
HEALTH_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_api(host: str, data_dir: Path) -> tuple[subprocess.Popen, str, float, Path]:
    """Starts ``incseg api`` without any INCSEG_* variable; returns it, its URL, the seconds until
    ``/health`` answered, and its log."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("INCSEG_")}
    env.update(INCSEG_SERVE_SIZE="32", INCSEG_ORT_THREADS="1")
    log_path = data_dir.parent / f"api-{port}.log"
    command = [str(INCSEG), "api", "--host", host, "--port", str(port), "--data-dir", str(data_dir)]
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - started < HEALTH_TIMEOUT_S:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url, time.monotonic() - started, log_path
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"incseg api never answered /health; see {log_path}")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        process, url, up_s, log_path = start_api("0.0.0.0", data_dir)
        path = key_file(data_dir)
        key = path.read_text().strip()
        print(
            f"incseg api --host 0.0.0.0, no key: /health after {up_s:.2f} s; key file mode "
            f"{oct(stat.S_IMODE(path.stat().st_mode))}, {len(key)} characters, printed "
            f"{log_path.read_text().count(key)} time(s)"
        )
        for method, route in PROTECTED:
            started = time.monotonic()
            without = httpx.request(method, url + route, timeout=10).status_code
            elapsed_ms = 1000 * (time.monotonic() - started)
            with_key = httpx.request(method, url + route, headers={"X-API-Key": key}, timeout=10).status_code
            print(f"  {method} {route}: without the key {without} ({elapsed_ms:.0f} ms), with it {with_key}")
        for route in PUBLIC:
            print(f"  GET {route} without the key: {httpx.get(url + route, timeout=10).status_code}")
        stop(process)

        process, url, up_s, _ = start_api("127.0.0.1", data_dir)
        print(f"incseg api --host 127.0.0.1 (key-free): /health after {up_s:.2f} s")
        for headers, sender in [
            ({}, "curl (no Origin)"),
            ({"Origin": "https://evil.example"}, "a page on another site"),
            ({"Origin": url}, "the service's own /docs page"),
            ({"X-Forwarded-For": "203.0.113.7"}, "a proxy"),
        ]:
            answer = httpx.post(f"{url}/models/v1/activate", headers=headers, timeout=10)
            detail = answer.json()["detail"][:60]
            print(f"  POST /models/v1/activate from {sender}: {answer.status_code} {detail!r}")
        stop(process)


if __name__ == "__main__":
    main()
