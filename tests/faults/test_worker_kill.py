"""SIGKILL of the worker mid-step with the API process in the loop: posted and followed over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import FINISHED, FaultStack, post_task, segment, wait_task
from tests.service.api_support import png_bytes, wait_until
from tests.service.conftest import image_files, make_dataset_archive, publish_tiny_version

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

# about 5 s of training for the tiny model on one busy core: long enough to be killed mid-step,
# short enough for the redelivered step to finish within the test
EPOCHS = 12


def test_worker_sigkill_mid_step_then_a_new_worker_finishes_it(stack: FaultStack, tmp_path: Path) -> None:
    registry = stack.registry
    registry.activate(publish_tiny_version(registry, ["background", "a", "b"]).name)
    api = stack.start_api()
    worker = stack.start_worker()
    image = png_bytes(32, 32)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "v1 to serve")
        archive = make_dataset_archive(tmp_path, 3, seed=2)
        posted = time.monotonic()
        task_id = post_task(client, archive, method="mib", epochs=EPOCHS)
        training = wait_task(
            client,
            task_id,
            lambda task: task["phase"] == "training" and 0 < task["fraction"] < 0.5,
            120,
            "training, before half way",
        )
        worker.kill()  # main and pool process at once: nobody is left to requeue the message
        killed = time.monotonic()

        # the dead worker's task reads running, the registry is untouched, v1 still serves
        orphan = client.get(f"/tasks/{task_id}").json()
        assert orphan["state"] == "running" and orphan["attempts"] == 1, orphan
        assert registry.active() == "v1" and [v.name for v in registry.versions()] == ["v1"]
        assert segment(client, image) == (200, "v1")

        new_worker = stack.start_worker()
        # start-up recovery, before the worker reports ready: the holder is dead, the task is requeued
        assert f"task {task_id} requeued: its worker died" in new_worker.log_path.read_text()
        done = wait_task(client, task_id, lambda task: task["state"] in FINISHED, 240, "to finish")
        finished = time.monotonic()
        assert done["state"] == "done", done["error"]
        assert done["attempts"] == 2 and done["base_version"] == "v1" and done["model_version"] == "v2"
        wait_until(lambda: segment(client, image) == (200, "v2"), 30, "the API to serve v2")
        models = client.get("/models").json()
        assert models["active"] == models["serving"] == "v2", models
    assert [v.name for v in registry.versions()] == ["v1", "v2"] and registry.active() == "v2"
    assert image_files(stack.settings.data_dir / "staging") == [], "the staged dataset is deleted"
    print(
        f"\nworker SIGKILL: killed at fraction {training['fraction']:.2f}, "
        f"{killed - posted:.1f} s after posting; done (attempt 2) {finished - killed:.1f} s after the kill"
    )
