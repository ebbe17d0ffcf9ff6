"""SIGKILL of an API process mid-swap, then a restart: it comes up serving the active version."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from export.onnx_export import export_onnx
from service.announce import announce_active
from service.registry import EXPORT_SUBDIR, MODEL_SUBDIR, Registry
from tests.faults.conftest import FaultStack, segment
from tests.service.api_support import png_bytes, wait_until
from tests.service.conftest import publish_tiny_version
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

# v2 is the service's default GPU model at its default serving size (ResNet-18, 128/256 channels, 512 px):
# its warm-up takes about a second on one core, a window wide enough to kill the API inside it
LARGE_SIZE = 512


def publish_large_version(registry: Registry, classes: list[str]) -> str:
    with registry.staging() as stage:
        torch.manual_seed(0)
        model = BiSeNet(BiSeNetConfig(len(classes), "resnet18", context_channels=128, embed_channels=256))
        ModelBundle(model, classes, [{"step": 0, "classes_added": classes[1:]}]).save(stage / MODEL_SUBDIR)
        export_onnx(
            stage / MODEL_SUBDIR, stage / EXPORT_SUBDIR, (LARGE_SIZE, LARGE_SIZE), parity_batches=(1,)
        )
        return registry.publish(stage, metrics=None, task_id=None, base_version=None, engine="not built").name


@pytest.mark.parametrize("moment", ["right after the announcement", "while loading v2"])
def test_api_sigkill_mid_swap_then_restart_serves_the_active_version(stack: FaultStack, moment: str) -> None:
    registry = stack.registry
    registry.activate(publish_tiny_version(registry, ["background", "a", "b"]).name)
    v2 = publish_large_version(registry, ["background", "a", "b", "c"])
    api = stack.start_api()
    image = png_bytes(32, 32)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        wait_until(lambda: segment(client, image) == (200, "v1"), 60, "v1 to serve")
        registry.activate(v2)
        announce_active(stack.settings, v2)  # what the worker does after publishing
        if moment == "while loading v2":
            wait_until(lambda: client.get("/models").json()["loading"] == v2, 30, "v2 to load", poll_s=0.02)
        kill_status = client.get("/models").json()
        api.kill()
    assert kill_status["serving"] == "v1", f"killed {moment}, before the swap: {kill_status}"

    restarted_at = time.monotonic()
    restarted = stack.start_api()
    with httpx.Client(base_url=restarted.url, timeout=30) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "the restarted API to be ready")
        ready_s = time.monotonic() - restarted_at
        assert segment(client, image) == (200, v2)
        models = client.get("/models").json()
    assert models["active"] == models["serving"] == v2 and models["swap_failures"] == 0, models
    assert [v.name for v in registry.versions()] == ["v1", v2] and registry.active() == v2
    print(
        f"\nAPI SIGKILL {moment} (loading={kill_status['loading']}): "
        f"restarted API ready on {v2} in {ready_s:.1f} s"
    )
