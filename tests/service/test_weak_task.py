"""A weak task (image-level labels, ``labels.csv``) through the service: a uvicorn API and a real Celery
worker (embedded mode). The base task learns from masks; the weak task adds its classes from the labels
alone, and both the task and the model views say ``supervision: weak``."""

from __future__ import annotations

from pathlib import Path

import httpx

from service.client import DemoOptions, write_demo_datasets
from service.settings import Settings
from tests.service.api_support import uvicorn_api, wait_until
from tests.service.test_api_loop import post_and_wait

TINY = DemoOptions(
    classes=4, new_classes=1, weak_classes=1, train_images=8, val_images=4, image_size=32, epochs=1, size=32
)


def wait_done(client: httpx.Client, location: str) -> dict:
    def finished() -> dict | None:
        task = client.get(location).json()
        return task if task["state"] in ("done", "failed", "cancelled") else None

    task = wait_until(finished, 300, f"task {location} to finish", poll_s=0.2)
    assert task["state"] == "done", task["error"]
    return task


def test_weak_task_ends_done_and_says_weak(settings: Settings, start_worker, tmp_path: Path) -> None:
    embedded = settings.model_copy(update={"poll_interval_s": 0.2, "orphan_timeout_s": 120.0})
    datasets = write_demo_datasets(tmp_path / "demo", TINY)
    names = (tmp_path / "demo" / "weak" / "classes.txt").read_text().split()
    base_names = (tmp_path / "demo" / "base" / "classes.txt").read_text().split()
    start_worker(embedded)
    with uvicorn_api(embedded, tmp_path / "api.log") as url, httpx.Client(base_url=url, timeout=60) as client:
        with datasets.weak.open("rb") as file:  # image-level labels cannot teach step 0
            refused = client.post("/tasks", files={"dataset": ("weak.zip", file)})
        assert refused.status_code == 422, refused.text
        assert refused.json()["entry"] == "labels.csv"
        assert refused.json()["detail"].startswith("labels.csv: step 0 needs masks")

        base = post_and_wait(client, datasets.base, "ft")
        assert base["supervision"] == "full"
        with datasets.weak.open("rb") as file:  # the 202 answer already says weak
            created = client.post("/tasks", files={"dataset": ("weak.zip", file)}, data={"method": "mib"})
        assert created.status_code == 202 and created.json()["supervision"] == "weak", created.text
        weak = wait_done(client, created.headers["Location"])
        assert (weak["supervision"], weak["model_version"], weak["base_version"]) == ("weak", "v2", "v1")
        assert weak["classes"] == names[len(base_names) :]
        assert {"miou_old", "miou_new", "miou_all"} <= set(weak["metrics"])  # the val split has masks
        assert weak["metrics"]["pseudo_labels"]["images"] > 0
        assert client.get(f"/tasks/{weak['id']}").json()["supervision"] == "weak"

        model = client.get("/models/v2").json()
        assert model["supervision"] == "weak" and model["history"][-1]["supervision"] == "weak"
        assert model["classes"] == names
        listing = client.get("/models").json()
        assert [(v["name"], v["supervision"]) for v in listing["versions"]] == [
            ("v1", "full"),
            ("v2", "weak"),
        ]
    leftovers = (
        [p for p in embedded.staging_dir.rglob("*") if p.is_file()] if embedded.staging_dir.exists() else []
    )
    assert leftovers == []  # the weak task's images and labels.csv are deleted too
