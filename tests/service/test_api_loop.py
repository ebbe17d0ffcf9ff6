"""The full loop through HTTP, scaled mode: real Redis, a real Celery worker process, uvicorn for the API.

Base task -> done -> segment (v1) -> incremental task -> done -> segment answers v2 with the new classes.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.client import DemoOptions, write_demo_datasets
from service.settings import Settings
from tests.service.api_support import uvicorn_api, wait_until

TINY_DEMO = DemoOptions(
    classes=5,
    new_classes=2,
    weak_classes=1,  # its archive is not posted here (tests/service/test_weak_task.py posts one)
    train_images=8,
    val_images=4,
    image_size=32,
    epochs=1,
    size=32,
    batch_size=2,
)


def post_and_wait(client: httpx.Client, archive: Path, method: str) -> dict:
    with archive.open("rb") as file:
        response = client.post("/tasks", files={"dataset": (archive.name, file)}, data={"method": method})
    assert response.status_code == 202, response.text
    location = response.headers["Location"]
    states = set()

    def finished() -> dict | None:
        task = client.get(location).json()
        states.add(task["state"])
        return task if task["state"] in ("done", "failed", "cancelled") else None

    task = wait_until(finished, 300, f"task {location} to finish", poll_s=0.2)
    assert task["state"] == "done", task["error"]
    assert "queued" in states or "running" in states or "exporting" in states
    return task


def segment(client: httpx.Client, image: Path) -> tuple[str, dict]:
    response = client.post(
        "/segment",
        params={"format": "json"},
        content=image.read_bytes(),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200, response.text
    return response.headers["X-Model-Version"], response.json()


def test_full_loop_through_http(redis_settings: Settings, start_worker, tmp_path: Path) -> None:
    # a generous orphan timeout: on a busy machine a 5 s heartbeat gap is not a dead worker
    settings = redis_settings.model_copy(update={"poll_interval_s": 0.2, "orphan_timeout_s": 120.0})
    datasets = write_demo_datasets(tmp_path / "demo", TINY_DEMO)
    base_zip, step_zip, image = datasets.base, datasets.step, datasets.image
    base_names = (tmp_path / "demo" / "base" / "classes.txt").read_text().split()
    all_names = (tmp_path / "demo" / "step" / "classes.txt").read_text().split()
    start_worker(settings)
    with (
        uvicorn_api(settings, tmp_path / "api.log") as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        assert (
            client.post(
                "/segment", content=image.read_bytes(), headers={"Content-Type": "image/png"}
            ).status_code
            == 409
        )

        base = post_and_wait(client, base_zip, "ft")
        assert base["model_version"] == "v1" and base["classes"] == base_names[1:]
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "v1 to be served")
        version, before = segment(client, image)
        assert version == "v1" and before["classes"] == base_names

        step = post_and_wait(client, step_zip, "mib")
        assert step["model_version"] == "v2" and step["base_version"] == "v1"
        assert step["classes"] == all_names[len(base_names) :]
        assert {"miou_old", "miou_new", "miou_all"} <= set(step["metrics"])
        wait_until(lambda: client.get("/models").json()["serving"] == "v2", 60, "v2 to be served")
        version, after = segment(client, image)
        assert version == "v2" and after["classes"] == all_names

        mask = client.post("/segment", content=image.read_bytes(), headers={"Content-Type": "image/png"})
        assert np.asarray(Image.open(io.BytesIO(mask.content))).max() < len(all_names)
        listing = client.get("/models").json()
        assert [v["name"] for v in listing["versions"]] == ["v1", "v2"] and listing["active"] == "v2"
        tasks = client.get("/tasks").json()
        assert tasks["total"] == 2 and [t["id"] for t in tasks["items"]] == [step["id"], base["id"]]
        assert 'incseg_tasks{state="done"} 2.0' in client.get("/metrics").text
    leftovers = (
        [p for p in settings.staging_dir.rglob("*") if p.is_file()] if settings.staging_dir.exists() else []
    )
    assert leftovers == []
