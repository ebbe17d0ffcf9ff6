"""Schemathesis against the app's own OpenAPI schema: no generated request may get a 5xx answer.

The app serves a real tiny model (so ``/segment`` runs inference) and has an API key, which every
generated request carries so that the mutating routes are exercised past the key check. Examples are
bounded per operation to keep the run near a minute.

Two setups: the app in-process (ASGI, embedded mode), and the scaled one: ``incseg api`` as a separate
process over HTTP with Redis as broker and a Celery worker process on its queue; there, after every
operation, the API process must still be alive and nothing may have been written outside the data
directory (the API runs in a sandbox directory whose every other file is compared before and after).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from service.api.main import create_app
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import SERVE_SIZE, ApiProcess, WorkerProcess, publish_version, wait_until
from tests.service.conftest import REDIS_URL

pytestmark = pytest.mark.badinput

API_KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    """The schema of an app whose registry has v1 active; schemathesis runs the app's lifespan itself."""
    app_settings = Settings(
        _env_file=None,
        data_dir=tmp_path_factory.mktemp("fuzz") / "data",
        instance=f"test-{uuid.uuid4().hex[:12]}",
        serve_size=SERVE_SIZE,
        ort_threads=1,
        poll_interval_s=0.1,
        api_key=API_KEY,
        max_upload_bytes=1 << 20,
    )
    registry = Registry(app_settings.registry_dir)
    registry.activate(publish_version(registry, ["background", "cat", "dog"]))
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(app_settings))


OPERATIONS = [
    ("POST", "/tasks"), ("GET", "/tasks"), ("GET", "/tasks/{task_id}"), ("DELETE", "/tasks/{task_id}"),
    ("POST", "/segment"), ("GET", "/models"), ("GET", "/models/{version}"),
    ("POST", "/models/{version}/activate"), ("GET", "/classes"), ("GET", "/health"), ("GET", "/ready"),
    ("GET", "/metrics"),
]  # fmt: skip


# operations with a constraint that negative generation can break (the others take only free strings)
CONSTRAINED = [("POST", "/tasks"), ("GET", "/tasks"), ("POST", "/segment")]
CASES = [(*op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (*op, GenerationMode.NEGATIVE) for op in CONSTRAINED
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=lambda value: str(value))
def test_no_request_gets_a_server_error(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    """Valid (positive) and schema-violating (negative) requests; every answer must be below 500."""
    # schemathesis starts the app's lifespan on the first request of a test and ends it after the test:
    # wait for the model server of this test's lifespan to serve v1 (else /ready rightly answers 503)
    ready = api_schema["/ready"]["GET"]
    wait_until(lambda: ready.Case().call().status_code == 200, 60, "v1 to be ready")
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=[not_a_server_error])

    check()


class ScaledSetup:
    """``incseg api`` (cwd: the sandbox) and a worker, on Redis, over one data directory in the sandbox."""

    def __init__(self, sandbox: Path, logs: Path, redis_db: int) -> None:
        self.sandbox = sandbox
        self.data_dir = sandbox / "data"
        self.settings = Settings(
            _env_file=None,
            data_dir=self.data_dir,
            redis_url=f"{REDIS_URL}/{redis_db}",
            instance=f"test-{uuid.uuid4().hex[:12]}",
            serve_size=SERVE_SIZE,
            ort_threads=1,
            poll_interval_s=0.1,
            api_key=API_KEY,
            max_upload_bytes=1 << 20,
        )
        registry = Registry(self.settings.registry_dir)
        registry.activate(publish_version(registry, ["background", "cat", "dog"]))
        self.worker = WorkerProcess(self.settings, logs / "worker.log")
        self.worker.wait_ready()
        self.api = ApiProcess(self.settings, logs / "api.log", cwd=sandbox)
        self.api.wait_healthy()
        # /models, not /ready: a 503 of /ready while v1 loads would count among the answers checked at the end
        keyed = {"X-API-Key": API_KEY}
        wait_until(
            lambda: httpx.get(f"{self.api.url}/models", headers=keyed).json()["serving"] == "v1",
            60,
            "v1 to serve",
        )
        self.outside = self.files_outside_data_dir()

    def files_outside_data_dir(self) -> set[str]:
        return {
            path.relative_to(self.sandbox).as_posix()
            for path in self.sandbox.rglob("*")
            if not path.is_relative_to(self.data_dir)
        }

    def answers_by_status(self) -> dict[str, int]:
        """Requests the API process answered, by status code (its Prometheus counter)."""
        counts: dict[str, int] = {}
        for line in httpx.get(f"{self.api.url}/metrics").text.splitlines():
            if line.startswith("incseg_http_requests_total{"):
                status = line.split('status="', 1)[1].split('"', 1)[0]
                counts[status] = counts.get(status, 0) + int(float(line.rsplit(" ", 1)[1]))
        return dict(sorted(counts.items()))

    def stop(self) -> None:
        self.api.stop()
        self.worker.stop()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory, redis_db: int) -> Iterator[ScaledSetup]:
    setup = ScaledSetup(tmp_path_factory.mktemp("scaled-sandbox"), tmp_path_factory.mktemp("logs"), redis_db)
    yield setup
    answers = setup.answers_by_status()
    setup.stop()
    print(f"\nscaled API answers by status: {answers}")
    assert not [status for status in answers if status.startswith("5")], answers


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=lambda value: str(value))
def test_scaled_api_over_http_gets_no_server_error(
    scaled: ScaledSetup, method: str, path: str, mode: GenerationMode
) -> None:
    """The same cases against the live API process: below 500, the process alive, no file outside."""
    schema = schemathesis.openapi.from_url(f"{scaled.api.url}/openapi.json")
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=[not_a_server_error], timeout=30)

    check()
    assert scaled.api.alive(), scaled.api.log()[-4000:]
    assert httpx.get(f"{scaled.api.url}/health").status_code == 200
    assert scaled.files_outside_data_dir() == scaled.outside, "files written outside the data directory"
    assert list((scaled.data_dir / "staging").glob("upload*")) == [], "a refused upload left files staged"
