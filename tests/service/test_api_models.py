"""``/models`` and the hot swap, against a real uvicorn process: swap under load, broken version, rollback.

The API runs as ``uvicorn service.api.main:create_app --factory`` in a subprocess with an API key and a
fast pointer poll; versions are real tiny models with their ONNX exports, published into the registry.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import SERVE_SIZE, png_bytes, publish_version, uvicorn_api, wait_until

API_KEY = "swap-test-key"
CLIENTS = 4


@dataclass
class Api:
    url: str
    registry: Registry
    versions: dict[str, str] = field(default_factory=dict)  # role -> version name

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": API_KEY}, timeout=30)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """v1 active and serving; v2 (one more class), a broken v3 and a parity-failed v4 published."""
    root = tmp_path_factory.mktemp("models")
    settings = Settings(
        _env_file=None,
        data_dir=root / "data",
        instance=f"test-{uuid.uuid4().hex[:12]}",
        serve_size=SERVE_SIZE,
        ort_threads=1,
        poll_interval_s=0.1,
        api_key=API_KEY,
    )
    registry = Registry(settings.registry_dir)
    versions = {
        "old": publish_version(registry, ["background", "cat", "dog"]),
        "new": publish_version(registry, ["background", "cat", "dog", "bird"]),
        "broken": publish_version(registry, ["background", "cat"], truncate_onnx=True),
        "unchecked": publish_version(registry, ["background", "cat"], parity_passed=False),
    }
    registry.activate(versions["old"])
    with uvicorn_api(settings, root / "api.log") as url:
        api = Api(url, registry, versions)
        with api.client() as client:
            wait_until(lambda: client.get("/ready").status_code == 200, 60, "the first version to be ready")
        yield api


def serving(client: httpx.Client) -> str | None:
    return client.get("/models").json()["serving"]


def activate_and_wait(client: httpx.Client, version: str) -> None:
    response = client.post(f"/models/{version}/activate")
    assert response.status_code == 200, response.text
    wait_until(lambda: serving(client) == version, 60, f"{version} to serve")


def test_models_list_and_detail(api: Api) -> None:
    with api.client() as client:
        activate_and_wait(client, api.versions["old"])
        listing = client.get("/models").json()
        assert [v["name"] for v in listing["versions"]] == sorted(api.versions.values())
        assert listing["active"] == listing["serving"] == api.versions["old"]
        detail = client.get(f"/models/{api.versions['new']}").json()
        assert detail["classes"] == ["background", "cat", "dog", "bird"]
        assert detail["parity_passed"] is True and "max_abs_error" in str(detail["parity"])
        assert any(name.endswith("model.onnx") for name in detail["files"])
        assert detail["active"] is False and detail["serving"] is False
        missing = client.get("/models/v99")
        assert missing.status_code == 404 and "v1" in missing.json()["detail"]


def test_hot_swap_under_load_never_fails_and_switches_once(api: Api) -> None:
    old, new = api.versions["old"], api.versions["new"]
    with api.client() as control:
        activate_and_wait(control, old)
        image = png_bytes(48, 64)
        seen: list[list[tuple[int, str | None]]] = [[] for _ in range(CLIENTS)]
        stop = threading.Event()

        def hammer(answers: list[tuple[int, str | None]]) -> None:
            with api.client() as client:
                while not stop.is_set():
                    response = client.post("/segment", content=image, headers={"Content-Type": "image/png"})
                    answers.append((response.status_code, response.headers.get("X-Model-Version")))

        threads = [threading.Thread(target=hammer, args=(answers,)) for answers in seen]
        for thread in threads:
            thread.start()
        try:
            wait_until(
                lambda: all(len(answers) >= 5 for answers in seen), 30, "steady answers before the swap"
            )
            assert control.post(f"/models/{new}/activate").status_code == 200
            # every client must see the new version a few times after the swap
            wait_until(
                lambda: all([v for _, v in answers[-5:]].count(new) == 5 for answers in seen),
                60,
                "every client to be answered by the new version",
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
    for answers in seen:
        assert {status for status, _ in answers} == {200}
        versions = [version for _, version in answers]
        switch = versions.index(new)
        assert switch > 0 and set(versions[:switch]) == {old} and set(versions[switch:]) == {new}
    metrics = httpx.get(f"{api.url}/metrics").text
    assert _metric(metrics, "incseg_model_swaps_total") >= 1


def test_a_broken_version_keeps_the_old_one_serving_and_is_reported(api: Api) -> None:
    good, broken = api.versions["new"], api.versions["broken"]
    with api.client() as client:
        activate_and_wait(client, good)
        failures_before = _metric(client.get("/metrics").text, "incseg_model_swap_failures_total")
        assert client.post(f"/models/{broken}/activate").status_code == 200
        detail = wait_until(
            lambda: client.get(f"/models/{broken}").json()["load_failure"], 60, "the load failure to show"
        )
        assert "model.onnx" in detail
        answer = client.post("/segment", content=png_bytes(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == good
        assert client.get("/ready").status_code == 200
        assert serving(client) == good
        assert _metric(client.get("/metrics").text, "incseg_model_swap_failures_total") >= failures_before + 1


def test_rollback_through_activate(api: Api) -> None:
    old, new = api.versions["old"], api.versions["new"]
    with api.client() as client:
        activate_and_wait(client, new)
        response = client.post(f"/models/{old}/activate")
        assert response.json()["active"] == old and response.json()["previous"] == new
        wait_until(lambda: serving(client) == old, 60, "the rollback to serve")
        answer = client.post(
            "/segment", params={"format": "json"}, content=png_bytes(), headers={"Content-Type": "image/png"}
        )
        assert answer.headers["X-Model-Version"] == old
        assert answer.json()["classes"] == ["background", "cat", "dog"]
        assert api.registry.active() == old


def test_activation_refuses_a_parity_failure_and_unknown_versions(api: Api) -> None:
    with api.client() as client:
        active = api.registry.active()
        refused = client.post(f"/models/{api.versions['unchecked']}/activate")
        assert refused.status_code == 409 and "parity" in refused.json()["detail"]
        assert client.post("/models/v404/activate").status_code == 404
        assert api.registry.active() == active
    with httpx.Client(base_url=api.url) as anonymous:
        assert anonymous.post(f"/models/{api.versions['old']}/activate").status_code == 401


def _metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in a Prometheus text exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
