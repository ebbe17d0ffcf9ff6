"""INCSEG_INT8 end to end: a step calibrates on its images before they are deleted and keeps only the table,
later steps merge the base version's table, the API serves INT8 when the gate passed and FP32 (saying why in
``/models``) when it failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from export.int8 import Int8Calibration, LabelledBatches
from export.manifest import CALIBRATION_FILE, ONNX_INT8_FILE, ONNX_INT8_TRT_FILE
from export.onnx_export import export_onnx
from export.parity import parity_inputs
from service.api.main import create_app
from service.db import TaskState, TaskStore
from service.pipeline import run_task
from service.registry import EXPORT_SUBDIR, MODEL_SUBDIR, Registry
from service.settings import Settings
from tests.helpers import make_int8_fragile, save_tiny_model
from tests.service.api_support import png_bytes, wait_until
from tests.service.conftest import image_files, make_dataset_archive, stage_dataset, tiny_settings
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from training.model_dir import ModelBundle


def test_steps_calibrate_on_their_images_and_keep_only_the_table(tmp_path: Path, instance: str) -> None:
    settings = tiny_settings(tmp_path / "data", instance, int8=True)
    store = TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")
    registry = Registry(settings.registry_dir)
    try:
        known = ["background"]
        for number, classes in ((1, 2), (2, 3)):
            staged = stage_dataset(settings, make_dataset_archive(tmp_path, classes, seed=number), known)
            task_id = store.create("mib", {}, staged.new_classes, staged.path).id
            task = run_task(task_id, settings, store, registry).task
            assert task.state == TaskState.DONE and task.model_version == f"v{number}", task.error
            assert image_files(settings.data_dir) == [], "the step's images are deleted after it"
            info = registry.get(f"v{number}")
            known = info.classes
            export_dir = registry.export_dir(info.name)
            for name in (CALIBRATION_FILE, ONNX_INT8_FILE, ONNX_INT8_TRT_FILE):
                assert (export_dir / name).is_file()
            table = json.loads((export_dir / CALIBRATION_FILE).read_text())["data"]
            assert all(len(entry["highest"]["data"]) == 1 for entry in table.values()), "ranges, not images"
            assert info.int8 is not None and info.int8["calibration"]["merged_tables"] == number - 1
            for target in ("cpu", "tensorrt"):
                gate = info.int8[target]
                assert gate["passed"] == (
                    gate["parity"]["argmax_agreement"] >= 0.99 and gate["parity"]["miou_loss"] <= 1.0
                )
    finally:
        store.dispose()


def _publish_int8(registry: Registry, fragile: bool) -> str:
    """A tiny version exported with INT8 (the fragile one fails its gate); returns its name."""
    size = (32, 32)
    with registry.staging() as stage:
        save_tiny_model(stage / MODEL_SUBDIR, ["background", "a", "b"])
        bundle = ModelBundle.load(stage / MODEL_SUBDIR)
        if fragile:
            make_int8_fragile(bundle.model)
            bundle.save(stage / MODEL_SUBDIR)
        images = LabelledBatches(parity_inputs(size, (4, 4), IMAGENET_MEAN, IMAGENET_STD), None)
        int8 = Int8Calibration(images, images)
        export_onnx(bundle, stage / EXPORT_SUBDIR, size, parity_batches=(1,), int8=int8)
        return registry.publish(stage, metrics=None, task_id=None, base_version=None, engine="not built").name


@pytest.fixture
def int8_settings(tmp_path: Path, instance: str) -> Settings:
    return tiny_settings(tmp_path / "data", instance, int8=True)


def test_models_says_int8_serves_or_why_fp32_serves(int8_settings: Settings) -> None:
    registry = Registry(int8_settings.registry_dir)
    passing, failing = _publish_int8(registry, fragile=False), _publish_int8(registry, fragile=True)
    registry.activate(passing)
    with TestClient(create_app(int8_settings)) as client:

        def serving(name: str) -> dict | None:
            listing = client.get("/models").json()
            return (
                next(v for v in listing["versions"] if v["name"] == name)
                if listing["serving"] == name
                else None
            )

        summary = wait_until(lambda: serving(passing), 60, f"{passing} serving")
        assert summary["serving_precision"] == "int8" and summary["precision_fallback"] is None
        assert summary["int8"]["cpu"]["passed"]
        assert client.post(f"/models/{failing}/activate").status_code == 200
        summary = wait_until(lambda: serving(failing), 60, f"{failing} serving")
        assert summary["serving_precision"] == "fp32" and not summary["int8"]["cpu"]["passed"]
        assert "model_int8.onnx failed the gate" in summary["precision_fallback"]
        answer = client.post("/segment", content=png_bytes(24, 40), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == failing
