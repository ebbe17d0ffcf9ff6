"""Schemathesis against the app's own OpenAPI schema: no generated request may get a 5xx answer.

The app serves a real tiny model (so ``/segment`` runs inference) and has an API key, which every
generated request carries so that the mutating routes are exercised past the key check. Examples are
bounded per operation to keep the run near a minute.
"""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service.api.main import create_app
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import SERVE_SIZE, publish_version, wait_until

API_KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    """The schema of an app serving v1; schemathesis runs the app's lifespan (the model server) itself."""
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
    app = create_app(app_settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    probe = TestClient(app)  # no lifespan of its own: the one schemathesis started serves
    wait_until(lambda: probe.get("/ready").status_code == 200, 60, "v1 to be ready")
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case) -> None:
    case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=[not_a_server_error])
