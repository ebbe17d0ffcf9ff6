"""Secure defaults: a key whenever the API listens beyond loopback, keys on reads, no cross-site writes,
no CORS unless asked, and 500 answers that carry no exception text."""

from __future__ import annotations

import logging
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.main import create_app
from service.api_key import KeyFileError, key_file, load_or_create_key, local_api_key, secure_settings
from service.db import TaskStore
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import (
    INCSEG_SCRIPT,
    ServiceProcess,
    free_port,
    png_bytes,
    publish_version,
    wait_until,
)

WRITE_KEY = "write-key-for-tests"
READ_KEY = "read-key-for-tests"
EVIL = "https://evil.example"
CONSOLE = "https://console.example"
MUTATIONS = [("POST", "/tasks"), ("DELETE", "/tasks/abc"), ("POST", "/models/v1/activate")]


def api_command(host: str, port: int, data_dir: Path) -> list[str]:
    return [str(INCSEG_SCRIPT), "api", "--host", host, "--port", str(port), "--data-dir", str(data_dir)]


def test_api_beyond_loopback_without_a_key_generates_one_that_replicas_share(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``incseg api --host 0.0.0.0`` without INCSEG_API_KEY: mutations need the generated key."""
    monkeypatch.delenv("INCSEG_API_KEY", raising=False)
    monkeypatch.delenv("INCSEG_ALLOW_UNAUTHENTICATED", raising=False)
    replicas = []
    try:
        for number in (1, 2):
            port = free_port()
            replica = ServiceProcess(
                api_command("0.0.0.0", port, settings.data_dir), settings, tmp_path / f"api{number}.log"
            )
            replicas.append(replica)
            url = f"http://127.0.0.1:{port}"
            replica.wait_healthy(url, 60)
            refused = httpx.post(f"{url}/models/v1/activate", timeout=10)
            assert refused.status_code == 401, refused.text  # was 404: the rollback route ran unauthenticated
            assert httpx.get(f"{url}/tasks", timeout=10).status_code == 401
            key = key_file(settings.data_dir).read_text().strip()
            passed = httpx.post(f"{url}/models/v1/activate", headers={"X-API-Key": key}, timeout=10)
            assert passed.status_code == 404, passed.text  # through the key check, then no version v1
        path = key_file(settings.data_dir)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = path.read_text().strip()
        assert len(key) >= 40
        assert replicas[0].log().count(key) == 1  # printed once, by the process that created it
        assert key not in replicas[1].log() and str(path.resolve()) in replicas[1].log()
    finally:
        for replica in replicas:
            replica.stop(30)


def test_a_broken_key_file_stops_the_start_with_a_message(settings: Settings, tmp_path: Path) -> None:
    key_file(settings.data_dir).parent.mkdir(parents=True)
    key_file(settings.data_dir).write_text("\n")
    api = ServiceProcess(
        api_command("0.0.0.0", free_port(), settings.data_dir), settings, tmp_path / "api.log"
    )
    assert api.process.wait(timeout=60) == 2
    message = " ".join(api.log().split())  # the console wraps long lines
    assert "holds no usable API key" in message and "delete it" in message


def test_loopback_stays_key_free_and_a_set_key_wins(settings: Settings) -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert secure_settings(settings, host).api_key is None, host
    assert not key_file(settings.data_dir).exists()
    keyed = settings.model_copy(update={"api_key": SecretStr(WRITE_KEY)})
    api_key = secure_settings(keyed, "0.0.0.0").api_key
    assert api_key is not None and api_key.get_secret_value() == WRITE_KEY
    assert not key_file(settings.data_dir).exists()


def test_the_opt_out_runs_without_a_key_and_warns(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    opted_out = settings.model_copy(update={"allow_unauthenticated": True})
    with caplog.at_level(logging.WARNING, logger="service.api_key"):
        assert secure_settings(opted_out, "0.0.0.0").api_key is None
    assert "without an API key" in caplog.text
    assert not key_file(settings.data_dir).exists()


def test_serve_beyond_loopback_gets_the_key_too(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from incseg.cli import main

    started: list[Settings] = []
    monkeypatch.delenv("INCSEG_API_KEY", raising=False)

    def serve(settings: Settings, host: str, port: int) -> int:
        started.append(settings)
        return 0

    monkeypatch.setattr("service.embedded.serve", serve)
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(settings.data_dir)]) == 0
    key = key_file(settings.data_dir).read_text().strip()
    started_key = started[0].api_key
    assert (
        started_key is not None and started_key.get_secret_value() == key and key in capsys.readouterr().out
    )
    assert main(["serve", "--data-dir", str(settings.data_dir)]) == 0  # default 127.0.0.1: no key
    assert started[1].api_key is None


def test_processes_starting_at_once_all_read_the_one_complete_key(tmp_path: Path) -> None:
    path = tmp_path / "data" / "api-key"
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(16)

    def start() -> None:
        barrier.wait()
        results.append(load_or_create_key(path))

    threads = [threading.Thread(target=start) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 16
    assert len({key for key, _ in results}) == 1 and sum(created for _, created in results) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["api-key"]  # no temporary file left


def test_key_file_errors_say_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "api-key"
    for content in (b"", b"two words\n", b"\xff\xfe", b"k" * 5000):
        path.write_bytes(content)
        with pytest.raises(KeyFileError, match="delete it"):
            load_or_create_key(path)


def test_the_client_uses_the_key_file_only_for_this_machine(tmp_path: Path) -> None:
    load_or_create_key(key_file(tmp_path))
    key = key_file(tmp_path).read_text().strip()
    assert local_api_key("http://127.0.0.1:8000", tmp_path) == key
    assert local_api_key("http://localhost:8000/", tmp_path) == key
    assert local_api_key("https://incseg.example.com", tmp_path) is None  # never sent elsewhere
    assert local_api_key("http://127.0.0.1:8000", tmp_path / "elsewhere") is None


@pytest.fixture
def keyed(settings: Settings) -> Iterator[tuple[TestClient, Settings]]:
    """An app with a write key and a read-only key."""
    keyed_settings = settings.model_copy(
        update={"api_key": SecretStr(WRITE_KEY), "api_read_key": SecretStr(READ_KEY), "poll_interval_s": 0.1}
    )
    with TestClient(create_app(keyed_settings), raise_server_exceptions=False) as client:
        yield client, keyed_settings


def task_reads(task_id: str) -> list[tuple[str, str, dict]]:
    image = {"content": png_bytes(), "headers": {"Content-Type": "image/png"}}
    return [
        ("GET", "/tasks", {}),
        ("GET", f"/tasks/{task_id}", {}),
        ("GET", "/models", {}),
        ("GET", "/models/v1", {}),
        ("GET", "/classes", {}),
        ("POST", "/segment", image),
    ]


def test_reads_need_a_key_when_one_is_set(keyed: tuple[TestClient, Settings]) -> None:
    client, settings = keyed
    registry = Registry(settings.registry_dir)
    registry.activate(publish_version(registry, ["background", "cat"]))
    store = TaskStore(settings.task_database_url)
    task = store.create("mib", {"epochs": 1}, ["secret-class"], None)
    try:
        for method, path, extra in task_reads(task.id):
            refused = client.request(method, path, **extra)
            assert refused.status_code == 401, (path, refused.text)  # was 200: every task's data for anyone
            assert "secret-class" not in refused.text and "X-API-Key" in refused.json()["detail"]
            for key in (READ_KEY, WRITE_KEY):
                headers = {**extra.get("headers", {}), "X-API-Key": key}
                answer = client.request(method, path, **{**extra, "headers": headers})
                assert answer.status_code in (200, 409), (path, answer.text)  # 409: v1 still loading
    finally:
        store.dispose()


@pytest.mark.parametrize(("method", "path"), MUTATIONS)
def test_the_read_key_cannot_mutate(keyed: tuple[TestClient, Settings], method: str, path: str) -> None:
    client, _ = keyed
    answer = client.request(method, path, headers={"X-API-Key": READ_KEY})
    assert answer.status_code == 403 and "read-only key" in answer.json()["detail"]


def test_health_ready_metrics_and_docs_stay_open_and_metrics_carry_no_task_data(
    keyed: tuple[TestClient, Settings],
) -> None:
    client, settings = keyed
    store = TaskStore(settings.task_database_url)
    task = store.create("mib", {"epochs": 1}, ["zebra-secret"], None)
    store.fail(task.id, None, "/srv/private/dataset/zebra-secret.png is corrupt")
    try:
        client.get(f"/tasks/{task.id}", headers={"X-API-Key": READ_KEY})
        for path in ("/health", "/ready", "/metrics", "/docs", "/openapi.json"):
            assert client.get(path).status_code in (200, 503), path  # 503: /ready before v1 is loaded
        text = client.get("/metrics").text
        assert 'incseg_tasks{state="failed"} 1.0' in text
        for private in (task.id, "zebra", "/srv/private", "corrupt", WRITE_KEY, READ_KEY):
            assert private not in text, private
    finally:
        store.dispose()


@pytest.fixture
def key_free(settings: Settings) -> Iterator[tuple[TestClient, Registry]]:
    """An app without a key (as on loopback): v1 and v2 published, v2 active."""
    registry = Registry(settings.registry_dir)
    publish_version(registry, ["background", "cat"])
    registry.activate(publish_version(registry, ["background", "cat", "dog"]))
    with TestClient(create_app(settings)) as client:
        yield client, registry


def test_a_cross_site_page_cannot_roll_back_a_key_free_service(key_free: tuple[TestClient, Registry]) -> None:
    """The form post a page on another site can send from the user's browser (no preflight)."""
    client, registry = key_free
    for origin in (EVIL, "null"):
        forged = client.post("/models/v1/activate", headers={"Origin": origin})
        assert forged.status_code == 403, forged.text  # was 200: the model rolled back to v1
        assert "cross-site" in forged.json()["detail"]
        assert registry.active() == "v2"
    assert client.post("/tasks", headers={"Origin": EVIL}).status_code == 403
    assert client.delete("/tasks/abc", headers={"Origin": EVIL}).status_code == 403
    same_site = client.post("/models/v1/activate", headers={"Origin": "http://testserver"})
    assert same_site.status_code == 200 and registry.active() == "v1"  # the service's own /docs page
    assert client.post("/models/v2/activate").status_code == 200  # curl, httpx, the CLI: no Origin
    assert registry.active() == "v2"


def test_a_key_free_service_refuses_what_a_reverse_proxy_forwards(
    key_free: tuple[TestClient, Registry],
) -> None:
    """A proxy in front of a loopback service would open it to everyone who reaches the proxy."""
    client, registry = key_free
    for name, value in [
        ("X-Forwarded-For", "203.0.113.7"),
        ("Forwarded", "for=203.0.113.7;proto=https"),
        ("X-Real-IP", "203.0.113.7"),
    ]:
        for method, path in [("GET", "/tasks"), ("GET", "/classes"), ("POST", "/models/v1/activate")]:
            answer = client.request(method, path, headers={name: value})
            assert answer.status_code == 403, (name, path, answer.text)  # was 200
            assert "INCSEG_API_KEY" in answer.json()["detail"]
        assert client.get("/health", headers={name: value}).status_code == 200
    assert registry.active() == "v2"


def test_no_cors_by_default(keyed: tuple[TestClient, Settings]) -> None:
    client, _ = keyed
    preflight = client.options(
        "/tasks",
        headers={
            "Origin": EVIL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert not [name for name in preflight.headers if name.lower().startswith("access-control-")]
    simple = client.post("/models/v1/activate", headers={"Origin": EVIL}, data={"x": "1"})
    assert simple.status_code == 401
    assert "access-control-allow-origin" not in simple.headers


def test_cors_allows_only_the_listed_origins(settings: Settings) -> None:
    allowed = settings.model_copy(update={"cors_allow_origins": [CONSOLE], "api_key": SecretStr(WRITE_KEY)})
    request_headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    with TestClient(create_app(allowed)) as client:
        console = client.options("/tasks", headers={"Origin": CONSOLE, **request_headers})
        assert console.status_code == 200
        assert console.headers["access-control-allow-origin"] == CONSOLE
        assert "x-api-key" in console.headers["access-control-allow-headers"].lower()
        evil = client.options("/tasks", headers={"Origin": EVIL, **request_headers})
        assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
        read = client.get("/tasks", headers={"Origin": CONSOLE, "X-API-Key": WRITE_KEY})
        assert read.status_code == 200 and read.headers["access-control-allow-origin"] == CONSOLE


def test_a_500_carries_no_exception_text_and_its_request_id_is_logged(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)
    secret = "could not open /srv/private/tasks.db as user incseg"

    def broken_page(offset: int, limit: int) -> None:
        raise RuntimeError(secret)

    monkeypatch.setattr(app.state.store, "page", broken_page)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        answer = client.get("/tasks")
    assert answer.status_code == 500
    assert "/srv/private" not in answer.text and "RuntimeError" not in answer.text  # both were in the body
    request_id = answer.json()["request_id"]
    assert request_id in answer.json()["detail"] and answer.headers["X-Request-ID"] == request_id
    logged = [record for record in caplog.records if request_id in record.getMessage()]
    assert logged and logged[0].exc_info is not None and secret in str(logged[0].exc_info[1])


def test_ready_names_a_failed_version_but_not_its_error(settings: Settings) -> None:
    """``/ready`` is public: a load failure's message (file paths) stays behind the key, in ``/models``."""
    registry = Registry(settings.registry_dir)
    broken = publish_version(registry, ["background", "cat"], truncate_onnx=True)
    registry.activate(broken)
    keyed_settings = settings.model_copy(update={"api_key": SecretStr(WRITE_KEY), "poll_interval_s": 0.1})
    with TestClient(create_app(keyed_settings)) as client:
        failure = wait_until(
            lambda: client.get("/models", headers={"X-API-Key": WRITE_KEY}).json()["versions"][0][
                "load_failure"
            ],
            60,
            "the broken version's load failure",
        )
        ready = client.get("/ready")
    assert ready.status_code == 503 and f"{broken} failed to load" in ready.json()["detail"]
    assert str(settings.registry_dir) in failure and str(settings.data_dir) not in ready.text  # was in it
