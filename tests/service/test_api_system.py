"""Service-level routes through HTTP: health, readiness before and after a model, metrics, API key, schema."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.main import create_app
from service.db import TaskStore
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import png_bytes, publish_version, wait_until

API_KEY = "s3cret-key"
# with the right key each request reaches its route, which then refuses the empty request on its own grounds
MUTATING = [("POST", "/tasks", 415), ("DELETE", "/tasks/abc", 404), ("POST", "/models/v1/activate", 404)]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"poll_interval_s": 0.1}))) as test_client:
        yield test_client


@pytest.fixture
def keyed_client(settings: Settings) -> Iterator[TestClient]:
    keyed = settings.model_copy(update={"api_key": SecretStr(API_KEY), "poll_interval_s": 0.1})
    with TestClient(create_app(keyed)) as test_client:
        yield test_client


def test_health_answers_without_a_model(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_ready_is_503_until_a_model_is_loaded_then_200(client: TestClient, settings: Settings) -> None:
    before = client.get("/ready")
    assert before.status_code == 503
    assert before.json()["ready"] is False and "post a base task" in before.json()["detail"]
    assert client.get("/classes").json() == {"version": None, "classes": ["background"]}

    registry = Registry(settings.registry_dir)
    registry.activate(publish_version(registry, ["background", "cat"]))
    wait_until(lambda: client.get("/ready").status_code == 200, 60, "the watcher to load v1")
    assert client.get("/ready").json() == {"ready": True, "version": "v1", "detail": "serving v1"}
    assert client.get("/classes").json() == {"version": "v1", "classes": ["background", "cat"]}


def test_metrics_cover_requests_by_route_template_tasks_and_swaps(
    client: TestClient, settings: Settings
) -> None:
    store = TaskStore(settings.task_database_url)
    task = store.create("mib", {"epochs": 1}, ["cat"], None)
    store.request_cancel(task.id)
    client.get(f"/tasks/{task.id}")
    client.get("/tasks/no-such-task")
    client.post("/segment", content=png_bytes(), headers={"Content-Type": "image/png"})  # 409: no model
    text = client.get("/metrics").text
    assert 'incseg_http_request_duration_seconds_count{method="GET",route="/tasks/{task_id}"}' in text
    assert 'incseg_http_requests_total{method="GET",route="/tasks/{task_id}",status="404"}' in text
    assert 'incseg_http_requests_total{method="POST",route="/segment",status="409"}' in text
    assert task.id not in text  # ids never become labels
    assert 'incseg_tasks{state="cancelled"} 1.0' in text
    assert 'incseg_tasks{state="queued"} 0.0' in text
    assert 'incseg_task_duration_seconds_count{state="done"}' in text
    assert "incseg_model_swaps_total" in text
    assert "incseg_model_swap_failures_total" in text
    store.dispose()


@pytest.mark.parametrize(("method", "path", "status"), MUTATING)
@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["without-key", "wrong-key"])
def test_mutating_endpoints_refuse_a_missing_or_wrong_key(
    keyed_client: TestClient, method: str, path: str, status: int, key: str | None
) -> None:
    headers = {"X-API-Key": key} if key else {}
    response = keyed_client.request(method, path, headers=headers)
    assert response.status_code == 401
    assert "X-API-Key" in response.json()["detail"]


@pytest.mark.parametrize(("method", "path", "status"), MUTATING)
def test_the_right_key_passes_the_check(
    keyed_client: TestClient, method: str, path: str, status: int
) -> None:
    assert keyed_client.request(method, path, headers={"X-API-Key": API_KEY}).status_code == status


def test_liveness_and_metrics_need_no_key_but_reads_do(keyed_client: TestClient) -> None:
    for path in ("/health", "/metrics"):
        assert keyed_client.get(path).status_code == 200, path
    for path in ("/tasks", "/models", "/classes"):
        assert keyed_client.get(path).status_code == 401, path
        assert keyed_client.get(path, headers={"X-API-Key": API_KEY}).status_code == 200, path


def test_openapi_documents_every_route_with_summary_and_errors(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    expected = {
        ("post", "/tasks"), ("get", "/tasks"), ("get", "/tasks/{task_id}"), ("delete", "/tasks/{task_id}"),
        ("post", "/segment"), ("get", "/models"), ("get", "/models/{version}"),
        ("post", "/models/{version}/activate"), ("get", "/classes"), ("get", "/health"), ("get", "/ready"),
        ("get", "/metrics"),
    }  # fmt: skip
    found = {(method, path) for path, item in schema["paths"].items() for method in item}
    assert found == expected
    for method, path in expected:
        operation = schema["paths"][path][method]
        assert operation.get("summary"), (method, path)
        assert "200" in operation["responses"] or "202" in operation["responses"], (method, path)
    assert {"400", "401", "413", "415", "422"} <= set(schema["paths"]["/tasks"]["post"]["responses"])
    assert {"409", "415", "422"} <= set(schema["paths"]["/segment"]["post"]["responses"])
    assert {"401", "404", "409"} <= set(schema["paths"]["/models/{version}/activate"]["post"]["responses"])
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]
