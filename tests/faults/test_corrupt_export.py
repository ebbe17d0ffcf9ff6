"""A corrupt ONNX model or TensorRT engine in the registry: refused at load, the old version serves."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from export.manifest import file_sha256
from export.onnx_export import export_onnx
from export.runtime import DEFAULT_MAX_BATCH
from export.tensorrt_engine import ENGINE_FILE, ensure_engine, serving_precision, tensorrt_available
from service.registry import EXPORT_SUBDIR, MANIFEST_JSON, MODEL_SUBDIR, Registry
from tests.faults.conftest import FaultStack, segment
from tests.helpers import save_tiny_model
from tests.service.api_support import SERVE_SIZE, png_bytes, wait_until
from tests.service.conftest import publish_tiny_version

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

CLASSES = ["background", "a", "b", "c"]


def truncate_onnx(export_dir: Path) -> None:
    """Half of ``model.onnx`` (an interrupted copy): the manifest's sha256 no longer matches."""
    onnx_path = export_dir / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[: onnx_path.stat().st_size // 2])


def garble_onnx_keeping_the_hash(export_dir: Path) -> None:
    """Random bytes for ``model.onnx`` with the manifest's sha256 updated: only ONNX Runtime can tell."""
    onnx_path = export_dir / "model.onnx"
    onnx_path.write_bytes(np.random.default_rng(0).bytes(onnx_path.stat().st_size))
    manifest_path = export_dir / MANIFEST_JSON
    manifest = json.loads(manifest_path.read_text())
    manifest["onnx_sha256"] = file_sha256(onnx_path)
    manifest_path.write_text(json.dumps(manifest))


def corrupt_engine(export_dir: Path) -> None:
    """Builds the engine the API would build on this GPU, then overwrites its second half: the engine
    manifest still matches (GPU, TensorRT version, ONNX hash, precision, profile), so the API's loader
    deserializes the damaged file instead of rebuilding it."""
    ensure_engine(export_dir, serving_precision(export_dir, fp16=True), DEFAULT_MAX_BATCH)
    engine_path = export_dir / ENGINE_FILE
    data = bytearray(engine_path.read_bytes())
    half = len(data) // 2
    data[half:] = np.random.default_rng(0).bytes(len(data) - half)
    engine_path.write_bytes(bytes(data))


def publish_damaged(registry: Registry, damage: Callable[[Path], None]) -> str:
    with registry.staging() as stage:
        save_tiny_model(stage / MODEL_SUBDIR, CLASSES)
        export_onnx(
            stage / MODEL_SUBDIR, stage / EXPORT_SUBDIR, (SERVE_SIZE, SERVE_SIZE), parity_batches=(1,)
        )
        damage(stage / EXPORT_SUBDIR)
        return registry.publish(stage, metrics=None, task_id=None, base_version=None, engine="test").name


NO_GPU = "the TensorRT engine path needs a CUDA GPU with TensorRT (the API serves engines only there)"
DAMAGES = [
    pytest.param(truncate_onnx, "truncated, corrupt or replaced", id="truncated onnx"),
    pytest.param(
        garble_onnx_keeping_the_hash, "ONNX Runtime cannot load it", id="garbled onnx, hash updated"
    ),
    pytest.param(
        corrupt_engine,
        "could not deserialize",
        id="corrupt tensorrt engine",
        marks=pytest.mark.skipif(not tensorrt_available(), reason=NO_GPU),
    ),
]


@pytest.mark.parametrize(("damage", "expected"), DAMAGES)
def test_a_corrupt_version_is_refused_and_the_old_one_serves(
    stack: FaultStack, damage: Callable[[Path], None], expected: str
) -> None:
    registry = stack.registry
    registry.activate(publish_tiny_version(registry, ["background", "a", "b"]).name)
    v2 = publish_damaged(registry, damage)
    api = stack.start_api()
    image = png_bytes(32, 32)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        wait_until(lambda: segment(client, image) == (200, "v1"), 60, "v1 to serve")
        activation = client.post(f"/models/{v2}/activate")
        assert activation.status_code == 200, activation.text  # the pointer moves; the load happens after

        def refused() -> dict | None:
            models = client.get("/models").json()
            return models if models["swap_failures"] else None

        models = wait_until(refused, 30, f"the API to refuse {v2}")
        assert models["active"] == v2 and models["serving"] == "v1", models
        failure = next(version["load_failure"] for version in models["versions"] if version["name"] == v2)
        assert expected in failure, failure
        assert [segment(client, image) for _ in range(5)] == [(200, "v1")] * 5
        metrics = client.get("/metrics").text  # each retry of the damaged version fails again
        failures = metric(metrics, "incseg_model_swap_failures_total")
        retries = metric(metrics, "incseg_model_load_retries_total")  # one may be in flight
        assert failures >= 1 and failures - retries in (0, 1)
    api.stop()

    # a process started while the pointer names the damaged version has no old one to keep: it says why,
    # and when it tries again
    restarted = stack.start_api()
    with httpx.Client(base_url=restarted.url, timeout=60) as client:
        wait_until(lambda: client.get("/models").json()["swap_failures"], 30, f"the restart to refuse {v2}")
        response = client.post("/segment", content=image, headers={"Content-Type": "image/png"})
        assert response.status_code == 503, response.text
        assert f"model version {v2} failed to load" in response.json()["detail"]
        assert int(response.headers["Retry-After"]) >= 1
        assert client.post("/models/v1/activate").status_code == 200  # the rollback restores serving
        wait_until(lambda: segment(client, image) == (200, "v1"), 30, "v1 to serve again")


def metric(text: str, name: str) -> float:
    """A metric's value in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0
