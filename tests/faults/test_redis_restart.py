"""Redis restarted (``shutdown nosave``, then the same start command) during a task and /segment traffic.

The restart without persistence loses every message Redis held: the queued task's message and the running
step's unacknowledged one. The task table is the record: the running step goes on (the worker does not
cancel it on the connection loss), and the worker re-sends the queued task when its connection is back.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import FINISHED, FaultStack, SegmentTraffic, post_task, wait_task
from tests.service.api_support import wait_until
from tests.service.conftest import image_files, make_dataset_archive, publish_tiny_version

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

EPOCHS = 12
REDIS_DOWN_S = 3.0


def test_redis_restart_during_a_task_and_segment_traffic(stack: FaultStack, tmp_path: Path) -> None:
    registry = stack.registry
    registry.activate(publish_tiny_version(registry, ["background", "a", "b"]).name)
    api = stack.start_api()
    worker = stack.start_worker()
    with httpx.Client(base_url=api.url, timeout=30) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "v1 to serve")
        running = post_task(client, make_dataset_archive(tmp_path, 3, seed=2), method="mib", epochs=EPOCHS)
        wait_task(
            client,
            running,
            lambda task: task["phase"] == "training" and task["fraction"] > 0,
            120,
            "training",
        )
        queued = post_task(client, make_dataset_archive(tmp_path, 4, seed=3), method="mib", epochs=1)
        assert client.get(f"/tasks/{queued}").json()["state"] == "queued"
        ids_before = {task["id"] for task in client.get("/tasks").json()["items"]}

        with SegmentTraffic(api.url) as traffic:
            time.sleep(1)
            stack.redis.shutdown()
            down_at = time.monotonic()
            archive = make_dataset_archive(tmp_path, 4, seed=4)
            with archive.open("rb") as file:
                refused = client.post("/tasks", files={"dataset": (archive.name, file)})
            refused_s = time.monotonic() - down_at
            time.sleep(max(0.0, REDIS_DOWN_S - (time.monotonic() - down_at)))
            stack.redis.start()
            up_at = time.monotonic()
            first = wait_task(client, running, lambda task: task["state"] in FINISHED, 240, "to finish")
            second = wait_task(client, queued, lambda task: task["state"] in FINISHED, 240, "to finish")
            finished_at = time.monotonic()
            wait_until(lambda: traffic.versions() and traffic.versions()[-1] == "v3", 30, "v3 to serve")

        # a task posted while Redis is down: 503 with Retry-After, the row failed with the reason
        assert refused.status_code == 503 and "unreachable" in refused.json()["detail"], refused.text
        assert refused.headers["Retry-After"] == "5"
        tasks = client.get("/tasks").json()["items"]
        refused_rows = [task for task in tasks if task["id"] not in ids_before]
        assert len(refused_rows) == 1 and refused_rows[0]["state"] == "failed"
        assert "could not queue the task" in refused_rows[0]["error"]
        assert ids_before <= {task["id"] for task in tasks}, "no task row is lost"

        # the running step went on; the queued one was re-sent by the reconnected worker and ran after it
        assert first["state"] == "done" and first["attempts"] == 1 and first["model_version"] == "v2", first
        assert (
            second["state"] == "done" and second["base_version"] == "v2" and second["model_version"] == "v3"
        )
        assert "re-sent 1 queued task(s)" in worker.log_path.read_text()

        # /segment never failed and never went back to an older version
        outcomes = traffic.outcomes()
        answered = traffic.versions()
        versions = [version for version in answered if version is not None]
        assert set(outcomes) == {"200"}, outcomes
        assert versions == answered, "every 200 answer names its version"
        assert versions == sorted(versions, key=lambda name: int(name[1:])) and versions[0] == "v1"

        # the API's announcement listener is subscribed again
        channel = stack.settings.active_channel
        assert stack.redis.cli("pubsub", "numsub", channel).stdout.split() == [channel, "1"]
    assert image_files(stack.settings.data_dir / "staging") == []
    print(
        f"\nRedis down {REDIS_DOWN_S:.0f} s: {sum(outcomes.values())} /segment answers {dict(outcomes)}, "
        f"versions {sorted(set(versions))}; POST /tasks while down: {refused.status_code} "
        f"in {refused_s:.1f} s; "
        f"both tasks done {finished_at - up_at:.1f} s after Redis was back"
    )
