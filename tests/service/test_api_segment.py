"""``POST /segment`` through HTTP: the three formats, both ways to send an image, and every error answer."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.main import create_app
from service.registry import Registry
from service.settings import Settings
from tests.service.api_support import SERVE_SIZE, png_bytes, publish_version, wait_until

CLASSES = ["background", "cat", "dog"]
HEIGHT, WIDTH = 37, 53  # odd and non-square: the mask must come back at exactly this size


def module_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=tmp_path_factory.mktemp("segment") / "data",
        instance=f"test-{uuid.uuid4().hex[:12]}",
        serve_size=SERVE_SIZE,
        ort_threads=1,
        poll_interval_s=0.1,
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app serving v1 (three classes), ready."""
    settings = module_settings(tmp_path_factory)
    registry = Registry(settings.registry_dir)
    registry.activate(publish_version(registry, CLASSES))
    with TestClient(create_app(settings)) as test_client:
        wait_until(lambda: test_client.get("/ready").status_code == 200, 60, "v1 to be ready")
        yield test_client


@pytest.fixture
def empty_client(settings: Settings) -> Iterator[TestClient]:
    """An app with an empty registry (no model yet)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post_png(client: TestClient, data: bytes, output: str | None = None):
    params = {"format": output} if output else {}
    return client.post("/segment", params=params, content=data, headers={"Content-Type": "image/png"})


def test_png_is_a_palette_mask_at_the_image_size(client: TestClient) -> None:
    response = post_png(client, png_bytes(HEIGHT, WIDTH))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["X-Model-Version"] == "v1"
    mask = Image.open(io.BytesIO(response.content))
    assert mask.mode == "P" and mask.size == (WIDTH, HEIGHT)
    assert np.asarray(mask).max() < len(CLASSES)


def test_json_gives_class_fractions_and_the_class_list(client: TestClient) -> None:
    png = post_png(client, png_bytes(HEIGHT, WIDTH, seed=1))
    response = post_png(client, png_bytes(HEIGHT, WIDTH, seed=1), "json")
    assert response.status_code == 200
    body = response.json()
    assert response.headers["X-Model-Version"] == body["version"] == "v1"
    assert body["classes"] == CLASSES
    assert (body["width"], body["height"]) == (WIDTH, HEIGHT)
    labels = np.asarray(Image.open(io.BytesIO(png.content)))
    expected = {CLASSES[k]: np.mean(labels == k) for k in np.unique(labels)}
    assert body["fractions"] == pytest.approx(expected)


def test_overlay_is_a_jpeg_of_the_image(client: TestClient) -> None:
    response = post_png(client, png_bytes(HEIGHT, WIDTH), "overlay")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["X-Model-Version"] == "v1"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and image.size == (WIDTH, HEIGHT)


def test_multipart_field_and_raw_body_give_the_same_mask(client: TestClient) -> None:
    data = png_bytes(HEIGHT, WIDTH, seed=2)
    raw = post_png(client, data)
    multipart = client.post("/segment", files={"image": ("photo.png", data, "image/png")})
    assert multipart.status_code == 200
    assert multipart.content == raw.content


def test_jpeg_body_is_accepted(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(HEIGHT, WIDTH))).save(buffer, format="JPEG")
    response = client.post("/segment", content=buffer.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (WIDTH, HEIGHT)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/octet-stream", None])
def test_a_body_that_is_not_an_image_type_is_415(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/segment", content=png_bytes(), headers=headers)
    assert response.status_code == 415
    assert "image/*" in response.json()["detail"]
    assert response.headers["X-Model-Version"] == "v1"


def _bomb_png() -> bytes:
    """A 9000 x 9000 one-bit PNG: about 10 kB on the wire, 81 M pixels (243 MB as RGB) once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"definitely not an image", "no image format"),
        (png_bytes()[:300], "could not be decoded"),
        (_bomb_png(), "over the limit"),
    ],
    ids=["garbage", "truncated", "decompression-bomb"],
)
def test_undecodable_or_oversized_images_are_422(client: TestClient, data: bytes, message: str) -> None:
    response = post_png(client, data)
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert response.headers["X-Model-Version"] == "v1"


def test_multipart_without_the_image_field_is_422(client: TestClient) -> None:
    response = client.post("/segment", files={"picture": ("a.png", png_bytes(), "image/png")})
    assert response.status_code == 422
    assert "'image'" in response.json()["detail"]


def test_unknown_format_is_422(client: TestClient) -> None:
    response = post_png(client, png_bytes(), "gif")
    assert response.status_code == 422
    assert "format" in response.json()["detail"]


def test_no_model_yet_is_409_with_what_to_do(empty_client: TestClient) -> None:
    response = post_png(empty_client, png_bytes())
    assert response.status_code == 409
    assert "/tasks" in response.json()["detail"]
    assert "X-Model-Version" not in response.headers
