"""Bad files get clear errors naming them: manifest keys and types, ONNX hashes, weights, images."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.cli import add_subcommands
from export.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    ExportManifest,
    InvalidExportError,
    file_sha256,
    read_manifest,
    verify_model_file,
    write_json_atomic,
)
from export.onnx_export import export_onnx
from export.runtime import open_runtime
from tests.helpers import save_tiny_model
from training.model_dir import WEIGHTS_FILE

SIZE = (32, 32)
CLASSES = ["background", "cat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("manifest") / "model", CLASSES, history=[{"step": 0}])


@pytest.fixture(scope="module")
def pristine_export(model_dir: Path) -> Path:
    return export_onnx(model_dir, model_dir.parent / "export", SIZE, parity_batches=(1,)).out_dir


@pytest.fixture
def export_dir(pristine_export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine_export, tmp_path / "export"))


def _predict(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incseg")
    add_subcommands(parser.add_subparsers(required=True))
    parsed = parser.parse_args(["predict", *args])
    return parsed.func(parsed)


def _edit_manifest(export_dir: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((export_dir / MANIFEST_FILE).read_text())
    edit(manifest)
    (export_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_manifest_round_trips_through_the_typed_model(pristine_export: Path) -> None:
    manifest = read_manifest(pristine_export)
    assert isinstance(manifest, ExportManifest)
    assert manifest.classes == CLASSES and manifest.input_size == SIZE and manifest.version_name == "v1"
    assert manifest.to_json() == json.loads((pristine_export / MANIFEST_FILE).read_text())
    assert manifest.network_config["num_classes"] == len(CLASSES)
    assert verify_model_file(pristine_export, manifest) == pristine_export / ONNX_FILE


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (lambda m: m.pop("onnx_sha256"), "onnx_sha256", "field required"),
        (lambda m: m.pop("classes"), "classes", "field required"),
        (lambda m: m.update(input_size="big"), "input_size", "valid"),
        (lambda m: m.update(mean=[0.5, 0.5]), "mean.2", "field required"),
        (lambda m: m["source"].pop("weights_sha256"), "source.weights_sha256", "field required"),
        (lambda m: m.update(surprise=1), "surprise", "extra"),
        (lambda m: m.update(num_classes=5), "(top level)", "num_classes is 5"),
        (lambda m: m.update(format=2), "format", "1"),
    ],
)
def test_bad_manifest_names_the_file_and_the_key(
    export_dir: Path, edit: Callable[[dict], None], key: str, problem: str
) -> None:
    _edit_manifest(export_dir, edit)
    with pytest.raises(InvalidExportError) as caught:
        open_runtime(export_dir, "ort-cpu")
    message = str(caught.value)
    assert str(export_dir / MANIFEST_FILE) in message and f"key {key!r}" in message
    assert problem in message.lower()


def test_manifest_that_is_not_json(export_dir: Path) -> None:
    (export_dir / MANIFEST_FILE).write_text('{"format": 1, "classes": [')
    with pytest.raises(InvalidExportError, match="manifest.json: unreadable manifest"):
        read_manifest(export_dir)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: np.random.default_rng(0).bytes(len(data)), id="garbage"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_damaged_onnx_is_refused_by_its_hash(export_dir: Path, damage: Callable[[bytes], bytes]) -> None:
    onnx_path = export_dir / ONNX_FILE
    onnx_path.write_bytes(damage(onnx_path.read_bytes()))
    with pytest.raises(InvalidExportError, match=r"model\.onnx: sha256 .* truncated, corrupt or replaced"):
        open_runtime(export_dir, "ort-cpu")


def test_garbage_onnx_with_a_matching_hash_is_a_clear_load_error(export_dir: Path) -> None:
    onnx_path = export_dir / ONNX_FILE
    onnx_path.write_bytes(b"this is not a protobuf" * 100)
    _edit_manifest(export_dir, lambda m: m.update(onnx_sha256=file_sha256(onnx_path)))
    with pytest.raises(InvalidExportError, match=r"model\.onnx: ONNX Runtime cannot load it"):
        open_runtime(export_dir, "ort-cpu")


def test_cli_predict_on_a_damaged_export_exits_2_naming_the_file(
    export_dir: Path, tmp_path: Path, capsys
) -> None:
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    onnx_path = export_dir / ONNX_FILE
    onnx_path.write_bytes(onnx_path.read_bytes()[:1000])
    assert _predict(["--model", str(export_dir), str(image), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(onnx_path) in error and "Traceback" not in error


@pytest.mark.parametrize("backend", ["ort-cpu", "torch"])
def test_cli_predict_on_truncated_weights_exits_2_naming_the_file(
    model_dir: Path, tmp_path: Path, backend: str, capsys
) -> None:
    broken = Path(shutil.copytree(model_dir, tmp_path / "model", ignore=shutil.ignore_patterns("export-*")))
    weights = broken / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    args = ["--model", str(broken), str(image), "--out", str(tmp_path / "out"), "--backend", backend]
    assert _predict([*args, "--size", "32x32"]) == 2
    error = capsys.readouterr().err
    assert str(weights) in error and "Traceback" not in error


def test_cli_predict_reports_unreadable_images_and_segments_the_rest(
    pristine_export: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(good)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (400, 400)).save(bomb)  # a few hundred bytes that decode to 160 000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    out = tmp_path / "out"
    assert (
        _predict(["--model", str(pristine_export), str(text), str(good), str(bomb), "--out", str(out)]) == 2
    )
    captured = capsys.readouterr()
    assert f"{text}: cannot read image" in captured.err
    assert str(bomb) in captured.err and "downscale" in captured.err
    assert "2 of 3 images could not be read" in captured.err and "Traceback" not in captured.err
    assert sorted(path.name for path in out.iterdir()) == ["good_mask.png", "good_overlay.png"]
    assert "good.png (30x20)" in captured.out


def test_write_json_atomic_replaces_without_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "engine_manifest.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [item.name for item in tmp_path.iterdir()] == ["engine_manifest.json"]
    assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert json.loads(path.read_text()) == {"a": 2} and len(list(tmp_path.iterdir())) == 1
