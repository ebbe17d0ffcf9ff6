"""``incseg demo --url`` against a running service (embedded mode, no Redis): the three steps (base, masks,
image-level labels) and the versions."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from incseg.cli import main
from service.client import DemoOptions, ServiceClient, ServiceError, run_demo, write_demo_datasets
from service.settings import Settings
from tests.service.api_support import free_port, uvicorn_api
from training.data import read_folder_dataset

# 16 val images: one shows classes of both later tasks (the demo image)
TINY_DEMO = DemoOptions(train_images=8, val_images=16, image_size=32, epochs=1, size=32, batch_size=2)


def test_demo_datasets_split_the_classes(tmp_path: Path) -> None:
    datasets = write_demo_datasets(tmp_path, TINY_DEMO)
    names = {name: (tmp_path / name / "classes.txt").read_text().split() for name in ("base", "step", "weak")}
    base_count = 1 + TINY_DEMO.classes - TINY_DEMO.new_classes - TINY_DEMO.weak_classes
    assert names["base"] == names["step"][:base_count] and len(names["base"]) == base_count
    assert names["step"] == names["weak"][: base_count + TINY_DEMO.new_classes]
    assert len(names["weak"]) == 1 + TINY_DEMO.classes
    for name in ("base", "step"):
        labels = set()
        for mask in (tmp_path / name / "masks").glob("*.png"):
            labels |= set(np.unique(np.asarray(Image.open(mask))).tolist())
        assert labels <= set(range(len(names[name]))) | {255}
    weak = read_folder_dataset(tmp_path / "weak")
    assert all(sample.is_weak for sample in weak.train) and not any(sample.is_weak for sample in weak.val)
    assert all(archive.stat().st_size > 0 for archive in (datasets.base, datasets.step, datasets.weak))
    shown = set(np.unique(np.asarray(Image.open(tmp_path / "weak" / "masks" / f"{datasets.image.stem}.png"))))
    assert datasets.image.parent.parent == tmp_path / "weak"
    assert shown & set(range(base_count, base_count + TINY_DEMO.new_classes))  # a class of the second task
    assert shown & set(range(base_count + TINY_DEMO.new_classes, len(names["weak"])))  # and of the weak task


def test_an_unreachable_service_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="is the service running"):
        ServiceClient(f"http://127.0.0.1:{free_port()}").health()
    assert main(["demo", "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path)]) == 1


def test_demo_against_the_embedded_service(settings: Settings, start_worker, tmp_path: Path) -> None:
    """Embedded mode (filesystem broker, SQLite, pointer poll): a uvicorn API and a Celery worker."""
    embedded = settings.model_copy(update={"poll_interval_s": 0.2, "orphan_timeout_s": 120.0})
    start_worker(embedded)
    with uvicorn_api(embedded, tmp_path / "api.log") as url:
        result = run_demo(url, tmp_path / "demo", TINY_DEMO)
        models = httpx.get(f"{url}/models").json()
    assert [segmentation.version for segmentation in result["segmentations"]] == ["v1", "v2", "v3"]
    assert [len(classes) for classes in result["added"]] == [TINY_DEMO.new_classes, TINY_DEMO.weak_classes]
    assert [task["supervision"] for task in result["tasks"]] == ["full", "full", "weak"]
    for added, appeared in zip(result["added"], result["appeared"], strict=True):
        assert set(appeared) <= set(added)
    assert set(result["segmentations"][0].fractions) <= set(result["tasks"][0]["classes"]) | {"background"}
    assert [v["name"] for v in models["versions"]] == ["v1", "v2", "v3"] and models["serving"] == "v3"
    assert [v["supervision"] for v in models["versions"]] == ["full", "full", "weak"]
    for name in ("before.jpg", "after.jpg", "after-weak.jpg"):
        assert Image.open(tmp_path / "demo" / name).format == "JPEG"


def test_a_keyed_service_without_the_key_says_how_to_give_it(settings: Settings, tmp_path: Path) -> None:
    keyed = settings.model_copy(update={"api_key": SecretStr("client-test-key")})
    with uvicorn_api(keyed, tmp_path / "api.log") as url:
        with pytest.raises(ServiceError, match="401.*--api-key"):
            ServiceClient(url).models()
        assert ServiceClient(url, "client-test-key").models()["versions"] == []
