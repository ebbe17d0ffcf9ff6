"""The console's files through HTTP (no browser): served without a key, with a strict CSP, nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.api.main import create_app
from service.api.routes.console import CONSOLE_DIR
from service.settings import Settings


@pytest.fixture
def keyed_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"api_key": SecretStr("s3cret")}))) as client:
        yield client


def test_the_page_and_its_files_load_without_the_api_key(keyed_client: TestClient) -> None:
    page = keyed_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in sorted(path.name for path in CONSOLE_DIR.iterdir()):
        answer = keyed_client.get(f"/console/{name}")
        assert answer.status_code == 200, name
        assert answer.content == (CONSOLE_DIR / name).read_bytes()
    assert keyed_client.get("/console/app.js").headers["content-type"].startswith("text/javascript")


def test_nothing_outside_the_console_folder_is_served(keyed_client: TestClient) -> None:
    for path in ("/console/../api/main.py", "/console/%2e%2e/settings.py", "/console/missing.js"):
        answer = keyed_client.get(path)
        assert answer.status_code == 404 and answer.json() == {"detail": "Not Found"}, path


def test_the_console_is_not_part_of_the_api_schema(keyed_client: TestClient) -> None:
    paths = keyed_client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/console") for path in paths)
