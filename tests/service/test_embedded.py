"""``incseg serve`` as a user runs it: a subprocess serving the API with one worker and the embedded
broker, a task through HTTP, then Ctrl-C (SIGINT) stops both cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import image_files, make_dataset_archive

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_output(log: Path, pattern: str, process: subprocess.Popen, timeout_s: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while (match := re.search(pattern, log.read_text())) is None:
        assert process.poll() is None, f"incseg serve exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    return match


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_runs_a_task_and_stops_on_ctrl_c(settings: Settings, tmp_path: Path) -> None:
    port = _free_port()
    data_dir = tmp_path / "served"
    env = {**os.environ, **settings.to_env()}
    env.pop("INCSEG_DATA_DIR")
    log = tmp_path / "serve.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "incseg.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        url = _wait_output(
            log, r"incseg serving on (http://127\.0\.0\.1:\d+)  \(API docs: \S+/docs\)", server
        )[1]
        worker_pid = int(_wait_output(log, r"worker pid (\d+)", server)[1])
        _wait_output(log, r"Application startup complete", server)
        with httpx.Client(base_url=url, timeout=30) as client:
            archive = make_dataset_archive(tmp_path, 2, seed=1)
            with open(archive, "rb") as handle:
                answer = client.post("/tasks", files={"dataset": (archive.name, handle, "application/zip")})
            assert answer.status_code == 202, answer.text
            task_id = answer.json()["task_id"]
            deadline = time.monotonic() + 300
            while (task := client.get(f"/tasks/{task_id}").json())["state"] not in (
                "done",
                "failed",
                "cancelled",
            ):
                assert time.monotonic() < deadline, task
                time.sleep(0.5)
            assert task["state"] == "done" and task["model_version"] == "v1", task
            assert [model["name"] for model in client.get("/models").json()["versions"]] == ["v1"]
        assert image_files(data_dir) == []
        assert (data_dir / "tasks.db").is_file() and (data_dir / "registry" / "ACTIVE").is_file()
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=90)
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert "API stopped, worker stopped" in output
    assert not _alive(worker_pid), "the worker process ended with the server"
