"""Schemathesis against the app's own OpenAPI schema: no generated request may get a 5xx answer.

The app serves a real tiny model (so ``/segment`` runs inference) and has an API key, which every
generated request carries so that the mutating routes are exercised past the key check. Examples are
bounded per operation to keep the run near a minute.
"""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from service.api.main import create_app
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import SERVE_SIZE, publish_version, wait_until

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
