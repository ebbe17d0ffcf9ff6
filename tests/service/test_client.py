"""``incseg demo --url`` against a running service (embedded mode, no Redis): both steps and the versions."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from incseg.cli import main
from service.client import DemoOptions, ServiceClient, ServiceError, run_demo, write_demo_datasets
from service.settings import Settings
from tests.service.api_support import free_port, uvicorn_api

TINY_DEMO = DemoOptions(train_images=8, val_images=4, image_size=32, epochs=1, size=32, batch_size=2)


def test_demo_datasets_split_the_classes(tmp_path: Path) -> None:
    base_zip, step_zip, image = write_demo_datasets(tmp_path, TINY_DEMO)
    base_names = (tmp_path / "base" / "classes.txt").read_text().split()
    step_names = (tmp_path / "step" / "classes.txt").read_text().split()
    assert len(base_names) == 1 + TINY_DEMO.classes - TINY_DEMO.new_classes
    assert step_names[: len(base_names)] == base_names and len(step_names) == 1 + TINY_DEMO.classes
    base_labels = set()
    for mask in (tmp_path / "base" / "masks").glob("*.png"):
        base_labels |= set(Image.open(mask).getdata())
    assert base_labels <= set(range(len(base_names))) | {255}
    assert base_zip.stat().st_size > 0 and step_zip.stat().st_size > 0
    assert image.parent.parent == tmp_path / "step"


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
    assert (result["before"].version, result["after"].version) == ("v1", "v2")
    assert len(result["added"]) == TINY_DEMO.new_classes
    assert set(result["appeared"]) <= set(result["added"])
    assert set(result["before"].fractions) <= set(result["tasks"][0]["classes"]) | {"background"}
    assert [v["name"] for v in models["versions"]] == ["v1", "v2"] and models["serving"] == "v2"
    for name in ("before.jpg", "after.jpg"):
        assert Image.open(tmp_path / "demo" / name).format == "JPEG"


def test_a_keyed_service_without_the_key_says_how_to_give_it(settings: Settings, tmp_path: Path) -> None:
    keyed = settings.model_copy(update={"api_key": SecretStr("client-test-key")})
    with uvicorn_api(keyed, tmp_path / "api.log") as url:
        with pytest.raises(ServiceError, match="401.*--api-key"):
            ServiceClient(url).models()
        assert ServiceClient(url, "client-test-key").models()["versions"] == []
