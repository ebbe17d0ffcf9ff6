"""``/tasks`` through HTTP: accepted uploads, representative refusals (4xx naming the entry), paging, cancel.

The archive library tests every validation case (tests/service/test_archive.py); here a few of them show
that each reaches the client as its 4xx with a message, and that a refused upload leaves nothing behind.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.exc import OperationalError

from service.api.main import create_app
from service.db import TaskStore
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import publish_version
from training.data import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two foreground classes, a handful of 32 px images."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("upload") / "data", 2, 6, 2, 32, seed=5)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def dataset_files(root: Path, prefix: str = "") -> dict[str, bytes]:
    return {
        prefix + p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def post_dataset(client: TestClient, name: str, data: bytes, **fields: str):
    return client.post("/tasks", files={"dataset": (name, data, "application/octet-stream")}, data=fields)


def staging_leftovers(settings: Settings) -> list[str]:
    staging = settings.staging_dir
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


@pytest.mark.parametrize(
    ("name", "pack"),
    [
        ("data.zip", lambda root: zip_bytes(dataset_files(root))),
        ("data.tar.gz", lambda root: tar_gz_bytes(dataset_files(root, "mydata/"))),
    ],
    ids=["zip-at-root", "tar-gz-in-a-top-folder"],
)
def test_a_valid_dataset_is_queued_with_202_and_location(
    client: TestClient, settings: Settings, dataset: Path, name: str, pack
) -> None:
    response = post_dataset(client, name, pack(dataset), epochs="2", size="32", batch_size="2", method="ft")
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    assert response.headers["Location"] == f"/tasks/{task_id}"
    task = client.get(response.headers["Location"]).json()
    assert task["state"] == "queued"
    assert task["method"] == "ft" and task["supervision"] == response.json()["supervision"] == "full"
    assert task["classes"] == (dataset / "classes.txt").read_text().split()[1:]
    assert {"epochs": 2, "size": 32, "batch_size": 2}.items() <= task["options"].items()
    assert not [name for name in staging_leftovers(settings) if name.startswith("incoming-")]


def test_defaults_fill_the_options_left_out(client: TestClient, settings: Settings, dataset: Path) -> None:
    response = post_dataset(client, "data.zip", zip_bytes(dataset_files(dataset)))
    assert response.status_code == 202, response.text
    task = client.get(f"/tasks/{response.json()['task_id']}").json()
    assert task["method"] == settings.default_method
    assert task["options"]["epochs"] == settings.default_epochs


@pytest.mark.parametrize(
    ("active_method", "posted", "status_code", "queued_or_detail"),
    [
        ("star", None, 202, "star"),  # the default continues a star model
        ("star(sad=0)", None, 202, "star"),  # ... with the default's options
        ("star", "star", 202, "star"),
        ("star", "mib", 422, "trained with star (per-class sigmoids); mib cannot continue it"),
        ("mib", "star", 422, "trained with mib (a softmax); star cannot continue it"),
        ("mib", None, 202, "mib"),  # the default (star) cannot continue a softmax model: its own method
        ("mib(kd=5)", None, 202, "mib(kd=5)"),
    ],
)
def test_a_task_continues_the_active_model_with_a_method_of_its_kind(
    client: TestClient,
    settings: Settings,
    dataset: Path,
    active_method: str,
    posted: str | None,
    status_code: int,
    queued_or_detail: str,
) -> None:
    registry = Registry(settings.registry_dir)
    registry.activate(
        publish_version(registry, ["background", "unrelated"], history=[{"method": active_method}])
    )
    fields = {} if posted is None else {"method": posted}
    response = post_dataset(client, "data.zip", zip_bytes(dataset_files(dataset)), **fields)
    assert response.status_code == status_code, response.text
    if status_code == 202:
        assert client.get(f"/tasks/{response.json()['task_id']}").json()["method"] == queued_or_detail
    else:
        assert queued_or_detail in response.json()["detail"]
        assert staging_leftovers(settings) == []


def test_a_task_posted_behind_another_continues_that_ones_model(
    client: TestClient, settings: Settings, dataset: Path
) -> None:
    """Before the first model exists: the queued base task's method decides, not the default (star)."""
    archive = zip_bytes(dataset_files(dataset))
    base = post_dataset(client, "data.zip", archive, method="mib")
    assert base.status_code == 202, base.text
    follow = post_dataset(client, "data.zip", archive)
    assert follow.status_code == 202, follow.text
    assert client.get(f"/tasks/{follow.json()['task_id']}").json()["method"] == "mib"
    refused = post_dataset(client, "data.zip", archive, method="star")
    assert refused.status_code == 422
    assert (
        f"the model of task {follow.json()['task_id']} (queued before it) was trained with mib"
        in (refused.json()["detail"])
    )
    assert client.delete(f"/tasks/{base.json()['task_id']}").status_code == 200
    assert client.delete(f"/tasks/{follow.json()['task_id']}").status_code == 200
    # nothing unfinished and no model: the default again
    last = post_dataset(client, "data.zip", archive)
    assert client.get(f"/tasks/{last.json()['task_id']}").json()["method"] == settings.default_method


def _mask_of_wrong_size(root: Path) -> dict[str, bytes]:
    files = dataset_files(root)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(buffer, format="PNG")
    files["masks/train_00000.png"] = buffer.getvalue()
    return files


@pytest.mark.parametrize(
    ("name", "build", "status", "mentions"),
    [
        ("notes.zip", lambda root: b"this is not an archive", 415, "notes.zip"),
        (
            "data.zip",
            lambda root: zip_bytes({**dataset_files(root), "../escape.txt": b"x"}),
            400,
            "../escape.txt",
        ),
        ("data.zip", lambda root: zip_bytes(_mask_of_wrong_size(root)), 422, "train_00000"),
        (
            "data.zip",
            lambda root: zip_bytes({**dataset_files(root), "classes.txt": b"background\n"}),
            422,
            "class",
        ),
    ],
    ids=["not-an-archive", "zip-slip", "mask-size", "no-new-class"],
)
def test_refused_uploads_answer_4xx_naming_the_problem_and_leave_nothing(
    client: TestClient, settings: Settings, dataset: Path, name: str, build, status: int, mentions: str
) -> None:
    response = post_dataset(client, name, build(dataset))
    assert response.status_code == status, response.text
    assert mentions in response.json()["detail"]
    assert staging_leftovers(settings) == []
    assert client.get("/tasks").json()["total"] == 0


def test_an_upload_over_the_limit_is_413_while_streaming(settings: Settings, dataset: Path) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 10_000})
    with TestClient(create_app(small)) as client:
        boundary = "limit-test"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="dataset"; filename="a.zip"\r\n\r\n'
        # a generator body is sent chunked, without a Content-Length that would refuse it up front
        body = (part for part in [head.encode(), *[b"x" * 4096] * 10, f"\r\n--{boundary}--\r\n".encode()])
        response = client.post(
            "/tasks", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
    assert response.status_code == 413
    assert "INCSEG_MAX_UPLOAD_BYTES" in response.json()["detail"]
    assert staging_leftovers(small) == []


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [({"epochs": "0"}, "epochs"), ({"size": "big"}, "size"), ({"method": "nope"}, "unknown method")],
)
def test_bad_options_are_422_and_leave_nothing(
    client: TestClient, settings: Settings, dataset: Path, fields: dict, mentions: str
) -> None:
    response = post_dataset(client, "data.zip", zip_bytes(dataset_files(dataset)), **fields)
    assert response.status_code == 422
    assert mentions in response.json()["detail"]
    assert staging_leftovers(settings) == []


def test_a_form_without_the_dataset_file_is_400(client: TestClient) -> None:
    response = client.post("/tasks", files={"data": ("a.zip", b"x")}, data={"epochs": "1"})
    assert response.status_code == 400
    assert "'dataset'" in response.json()["detail"]


def test_tasks_are_listed_newest_first_in_pages(client: TestClient, settings: Settings) -> None:
    store = TaskStore(settings.task_database_url)
    ids = [store.create("mib", {}, [f"class{i}"], None).id for i in range(5)]
    page = client.get("/tasks", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 5 and (page["offset"], page["limit"]) == (1, 2)
    assert [task["id"] for task in page["items"]] == [ids[3], ids[2]]
    assert [task["id"] for task in client.get("/tasks").json()["items"]] == ids[::-1]
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}):
        response = client.get("/tasks", params=params)
        assert response.status_code == 422, params
        assert next(iter(params)) in response.json()["detail"]
    store.dispose()


def test_get_and_cancel_a_task(client: TestClient, settings: Settings) -> None:
    store = TaskStore(settings.task_database_url)
    task = store.create("mib", {}, ["cat"], None)
    assert client.get(f"/tasks/{task.id}").json()["state"] == "queued"
    cancelled = client.delete(f"/tasks/{task.id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = client.delete(f"/tasks/{task.id}")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    missing = client.get("/tasks/does-not-exist")
    assert missing.status_code == 404 and "does-not-exist" in missing.json()["detail"]
    store.dispose()


def test_a_database_error_after_staging_leaves_no_upload(settings: Settings, dataset: Path) -> None:
    """The task table refuses the row once the dataset is extracted: 500, and the images are deleted."""
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:

        def database_down(*_: object, **__: object) -> None:
            raise OperationalError("INSERT INTO incseg_tasks", {}, Exception("database is locked"))

        app.state.store.create = database_down
        response = post_dataset(client, "data.zip", zip_bytes(dataset_files(dataset)))
    assert response.status_code == 500, response.text
    assert staging_leftovers(settings) == []
