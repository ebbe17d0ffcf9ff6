"""The API without PyTorch: what an install of only the ``api`` extra (the API image) can do.

The model is trained and exported here, where torch is installed; the API then runs in a child process in
which ``torch``, ``torchvision`` and the other ``train``-extra packages cannot be imported (their
``sys.modules`` entries are None, so any import of them raises), started through the ``incseg api``
command as the API image starts it.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.registry import Registry
from service.settings import Settings
from tests.service.conftest import make_dataset_archive
from training.method_spec import METHOD_NAMES, parse_method_spec
from training.methods import METHODS, build_method
from training.models.bisenet import BACKBONES
from training.options import BACKBONE_NAMES

TRAIN_EXTRA_PACKAGES = ("torch", "torchvision", "onnx", "onnxscript", "matplotlib")
BLOCK_TRAIN_EXTRA = f"import sys; sys.modules.update(dict.fromkeys({TRAIN_EXTRA_PACKAGES!r}))"


def run_without_torch(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``code`` in a Python child process that cannot import the train extra."""
    return subprocess.run(
        [sys.executable, "-c", f"{BLOCK_TRAIN_EXTRA}\n{code}"],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def api_without_torch(settings: Settings, active_registry: Registry, tmp_path: Path) -> Iterator[str]:
    """``incseg api`` on the active tiny version, in a process without the train extra; yields its URL."""
    port = free_port()
    code = "from incseg.cli import main; sys.exit(main(sys.argv[1:]))"
    log = (tmp_path / "api.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"{BLOCK_TRAIN_EXTRA}\n{code}",
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env={**os.environ, **settings.to_env()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def png_bytes(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_child_process_cannot_import_torch(tmp_path: Path) -> None:
    result = run_without_torch("import torch", tmp_path)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_api_serves_segment_and_takes_tasks_without_torch(api_without_torch: str, tmp_path: Path) -> None:
    answer = httpx.post(
        f"{api_without_torch}/segment", files={"image": ("x.png", png_bytes(48, 40))}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png" and answer.headers["x-model-version"] == "v1"
    mask = Image.open(io.BytesIO(answer.content))
    assert mask.size == (48, 40) and mask.mode == "P"

    archive = make_dataset_archive(tmp_path, 4)
    for method, expected in [("mib(kd=5)", 202), ("mib+nope", 422), ("mib(kd=", 422)]:
        with archive.open("rb") as file:
            answer = httpx.post(
                f"{api_without_torch}/tasks",
                files={"dataset": (archive.name, file, "application/zip")},
                data={"method": method},
                timeout=60,
            )
        assert answer.status_code == expected, (method, answer.text)
        if expected == 422:
            assert "method" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["step", "--base", "none", "--data", "d", "--out", "o"], "incseg step"),
        (["worker"], "incseg worker"),
        (["export", "--model", "m", "--out", "o"], "incseg export"),
    ],
)
def test_training_commands_name_the_extra_to_install(argv: list[str], command: str, tmp_path: Path) -> None:
    result = run_without_torch(f"from incseg.cli import main; sys.exit(main({argv!r}))", tmp_path)
    assert result.returncode == 2
    assert f"{command} needs the train extra: pip install 'incseg[train]'" in " ".join(result.stderr.split())


def test_torch_free_names_match_the_builders() -> None:
    assert METHOD_NAMES == tuple(METHODS)
    assert BACKBONE_NAMES == tuple(BACKBONES)


@pytest.mark.parametrize("spec", ["mib+nope", "mib(kd=", "", "mib(1)"])
def test_spec_check_refuses_what_build_method_refuses(spec: str) -> None:
    with pytest.raises(ValueError) as parsed:
        parse_method_spec(spec)
    with pytest.raises(ValueError) as built:
        build_method(spec)
    assert str(parsed.value) == str(built.value)


def test_the_api_imports_no_worker_code(tmp_path: Path) -> None:
    """An API process sends tasks through service.train_queue: the worker's app, fork hooks and signal
    handlers (service.celery_app, service.worker) and the pipeline are never imported."""
    worker_modules = ("service.worker", "service.celery_app", "service.pipeline")
    code = (
        "import service.api.main, service.api.routes.tasks, service.jobs\n"
        f"print(sorted(m for m in {worker_modules!r} if m in sys.modules))"
    )
    result = run_without_torch(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
