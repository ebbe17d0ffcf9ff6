"""TensorRT engine bookkeeping: staleness rules and rebuild decisions (pure Python), real build on a GPU."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from export import tensorrt_engine
from export.manifest import ONNX_FILE, ONNX_FP16_FILE, InvalidExportError, file_sha256
from export.onnx_export import export_onnx
from export.parity import ParityError, run_onnx
from export.tensorrt_engine import (
    ENGINE_FILE,
    ENGINE_MANIFEST_FILE,
    DeviceInfo,
    engine_is_stale,
    engine_source,
    ensure_engine,
    profile_batches,
    serving_precision,
    tensorrt_available,
    timing_cache_path,
)
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig

SIZE = (64, 96)
DEVICE = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.9.0.34")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = BiSeNet(BiSeNetConfig(num_classes=3, backbone="resnet10", context_channels=16, embed_channels=16))
    root = tmp_path_factory.mktemp("export-trt")
    ModelBundle(model, ["background", "a", "b"]).save(root / "model")
    out = export_onnx(root / "model", root / "export", SIZE, parity_batches=(1,)).out_dir
    return out


def _manifest(**changes) -> dict:
    manifest = {
        "tensorrt_version": DEVICE.tensorrt_version,
        "gpu_name": DEVICE.gpu_name,
        "compute_capability": DEVICE.compute_capability,
        "onnx_sha256": "abc",
        "precision": "fp16",
        "profile": {"input": "images", "batch": [1, 2, 4], "shape": [3, *SIZE]},
    }
    return {**manifest, **changes}


def test_current_engine_is_not_stale() -> None:
    assert engine_is_stale(_manifest(), DEVICE, "abc", "fp16", 4) is None
    assert engine_is_stale(_manifest(), DEVICE, "abc", "fp16") is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"tensorrt_version": "10.3.0"}, "tensorrt_version"),
        ({"gpu_name": "NVIDIA A40"}, "gpu_name"),
        ({"compute_capability": "8.6"}, "compute_capability"),
        ({"onnx_sha256": "old"}, "onnx_sha256"),
        ({"precision": "fp32"}, "precision"),
        ({"profile": {"batch": [1, 4, 8]}}, "profile"),
    ],
)
def test_any_mismatch_is_a_reason_to_rebuild(changes: dict, field: str) -> None:
    reason = engine_is_stale(_manifest(**changes), DEVICE, "abc", "fp16", 4)
    assert reason is not None and field in reason


def test_missing_manifest_means_build() -> None:
    assert engine_is_stale(None, DEVICE, "abc", "fp16") == "no engine built yet"


def test_profile_and_timing_cache_naming(tmp_path: Path) -> None:
    assert profile_batches(1) == (1, 1, 1)
    assert profile_batches(4) == (1, 2, 4)
    assert profile_batches(9) == (1, 4, 9)
    with pytest.raises(ValueError):
        profile_batches(0)
    path = timing_cache_path(tmp_path, DEVICE)
    assert (
        path.parent == tmp_path and "h100" in path.name and "sm9.0" in path.name and "10.9.0.34" in path.name
    )
    assert timing_cache_path(tmp_path, DeviceInfo("NVIDIA A40", "8.6", "10.9.0.34")) != path


def test_engine_source_follows_the_tensorrt_generation(export_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(tensorrt_engine, "fp16_builder_flag_available", lambda: True)
    assert engine_source(export_dir, "fp16") == export_dir / ONNX_FILE
    monkeypatch.setattr(tensorrt_engine, "fp16_builder_flag_available", lambda: False)  # TensorRT 11
    assert engine_source(export_dir, "fp32") == export_dir / ONNX_FILE
    with pytest.raises(FileNotFoundError, match="--fp16"):
        engine_source(export_dir, "fp16")


def test_serving_precision_falls_back_to_fp32_without_an_fp16_source(
    export_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(tensorrt_engine, "fp16_builder_flag_available", lambda: True)  # TensorRT 10
    assert serving_precision(export_dir, True) == "fp16" and serving_precision(export_dir, False) == "fp32"
    monkeypatch.setattr(tensorrt_engine, "fp16_builder_flag_available", lambda: False)  # TensorRT 11
    assert serving_precision(export_dir, True) == "fp32"  # the export has no model_fp16.onnx
    with_fp16 = Path(shutil.copytree(export_dir, tmp_path / "export"))
    (with_fp16 / ONNX_FP16_FILE).write_bytes(b"")
    assert serving_precision(with_fp16, True) == "fp16"


class _FakeRunner:
    """Stands in for the TensorRT runner: ONNX Runtime logits, optionally with a shifted class."""

    shift = 0.0

    def __init__(self, engine_path: Path) -> None:
        self.onnx_path = Path(engine_path).parent / ONNX_FILE

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out = run_onnx(self.onnx_path, [batch])[0]
        out[:, 2] += self.shift
        return out


def test_ensure_engine_rebuilds_only_on_mismatch(export_dir: Path, tmp_path: Path, monkeypatch) -> None:
    device = {"info": DEVICE}
    builds = []

    def fake_build(onnx_path, engine_path, precision, max_batch, timing_cache):
        builds.append((precision, max_batch, timing_cache))
        Path(engine_path).write_bytes(f"engine {precision} {max_batch} {len(builds)}".encode())
        return {"input": "images", "batch": list(profile_batches(max_batch)), "shape": [3, *SIZE]}

    monkeypatch.setattr(tensorrt_engine, "current_device_info", lambda: device["info"])
    monkeypatch.setattr(tensorrt_engine, "fp16_builder_flag_available", lambda: True)
    monkeypatch.setattr(tensorrt_engine, "build_engine", fake_build)
    monkeypatch.setattr(tensorrt_engine, "EngineRunner", _FakeRunner)

    first = ensure_engine(export_dir, "fp16", 4, cache_dir=tmp_path)
    assert first.rebuilt and first.reason == "no engine built yet"
    manifest = json.loads((export_dir / ENGINE_MANIFEST_FILE).read_text())
    assert manifest == first.manifest
    assert manifest["onnx_sha256"] == file_sha256(export_dir / ONNX_FILE)
    assert manifest["gpu_name"] == DEVICE.gpu_name and manifest["tensorrt_version"] == DEVICE.tensorrt_version
    assert manifest["classes"] == ["background", "a", "b"] and manifest["input_shape"] == [3, *SIZE]
    assert manifest["profile"]["batch"] == [1, 2, 4] and manifest["parity"]["passed"]
    assert manifest["onnx_file"] == ONNX_FILE
    assert builds[0][2] == timing_cache_path(tmp_path, DEVICE)

    again = ensure_engine(export_dir, "fp16", 4, cache_dir=tmp_path)
    assert not again.rebuilt and again.reason is None and len(builds) == 1

    device["info"] = DeviceInfo(DEVICE.gpu_name, DEVICE.compute_capability, "10.12.0")
    upgraded = ensure_engine(export_dir, "fp16", 4, cache_dir=tmp_path)
    assert upgraded.rebuilt and "tensorrt_version" in (upgraded.reason or "") and len(builds) == 2
    assert "precision" in (ensure_engine(export_dir, "fp32", 4, cache_dir=tmp_path).reason or "")
    assert "profile" in (ensure_engine(export_dir, "fp32", 8, cache_dir=tmp_path).reason or "")
    assert ensure_engine(export_dir, "fp32", 8, cache_dir=tmp_path, force=True).rebuilt
    assert len(builds) == 5

    kept = (export_dir / ENGINE_FILE).read_bytes(), (export_dir / ENGINE_MANIFEST_FILE).read_text()
    monkeypatch.setattr(_FakeRunner, "shift", 100.0)  # the new engine disagrees with ONNX Runtime
    with pytest.raises(ParityError, match="tensorrt-fp16"):
        ensure_engine(export_dir, "fp16", 8, cache_dir=tmp_path)
    assert ((export_dir / ENGINE_FILE).read_bytes(), (export_dir / ENGINE_MANIFEST_FILE).read_text()) == kept
    assert sorted(path.name for path in export_dir.iterdir() if path.name.startswith(".")) == []


@pytest.mark.skipif(not tensorrt_available(), reason="needs the tensorrt package and a CUDA GPU")
def test_real_engine_build_and_inference(export_dir: Path, tmp_path: Path) -> None:
    from export.runtime import TensorRTRuntime

    build = ensure_engine(export_dir, "fp16", 4, cache_dir=tmp_path, force=True)
    assert build.rebuilt and build.manifest["parity"]["argmax_agreement"] >= 0.995
    assert timing_cache_path(tmp_path, tensorrt_engine.current_device_info()).is_file()
    runtime = TensorRTRuntime(export_dir, fp16=True, max_batch=4)
    try:
        assert runtime.backend == "trt" and runtime.max_batch == 4
        batch = np.random.default_rng(0).standard_normal((3, 3, *SIZE), dtype=np.float32)
        reference = run_onnx(export_dir / ONNX_FILE, [batch])[0]
        assert (runtime.predict_labels(batch) == reference.argmax(1)).mean() >= 0.995
        assert runtime.predict_logits(np.concatenate([batch, batch])).shape == (6, 3, *SIZE)
        masks = runtime.predict([np.zeros((97, 131, 3), np.uint8)] * 5)
        assert [mask.shape for mask in masks] == [(97, 131)] * 5
    finally:
        runtime.close()
    assert not ensure_engine(export_dir, "fp16", 4, cache_dir=tmp_path).rebuilt


def _fake_engine_machinery(monkeypatch, builds: list) -> None:
    """This GPU = DEVICE; builds write a placeholder engine; the runner is ONNX Runtime."""

    def fake_build(onnx_path, engine_path, precision, max_batch, timing_cache):
        builds.append(precision)
        Path(engine_path).write_bytes(b"engine")
        return {"input": "images", "batch": list(profile_batches(max_batch)), "shape": [3, *SIZE]}

    monkeypatch.setattr(tensorrt_engine, "current_device_info", lambda: DEVICE)
    monkeypatch.setattr(tensorrt_engine, "fp16_builder_flag_available", lambda: True)
    monkeypatch.setattr(tensorrt_engine, "build_engine", fake_build)
    monkeypatch.setattr(tensorrt_engine, "EngineRunner", _FakeRunner)


def test_unreadable_engine_manifest_means_rebuild(export_dir: Path, tmp_path: Path, monkeypatch) -> None:
    builds: list = []
    _fake_engine_machinery(monkeypatch, builds)
    work = Path(shutil.copytree(export_dir, tmp_path / "export"))
    ensure_engine(work, "fp16", 4, cache_dir=tmp_path)
    (work / ENGINE_MANIFEST_FILE).write_text('{"tensorrt_version": ')  # cut short
    rebuilt = ensure_engine(work, "fp16", 4, cache_dir=tmp_path)
    assert rebuilt.rebuilt and rebuilt.reason == "no engine built yet" and len(builds) == 2
    assert json.loads((work / ENGINE_MANIFEST_FILE).read_text()) == rebuilt.manifest


def test_damaged_onnx_is_refused_before_any_build(export_dir: Path, tmp_path: Path, monkeypatch) -> None:
    builds: list = []
    _fake_engine_machinery(monkeypatch, builds)
    work = Path(shutil.copytree(export_dir, tmp_path / "export"))
    before = sorted(path.name for path in work.iterdir())
    onnx_path = work / ONNX_FILE
    onnx_path.write_bytes(onnx_path.read_bytes()[:4096])
    with pytest.raises(InvalidExportError, match=r"model\.onnx: sha256"):
        ensure_engine(work, "fp16", 4, cache_dir=tmp_path, force=True)
    assert builds == [] and sorted(path.name for path in work.iterdir()) == before


def test_concurrent_opens_build_the_engine_once(export_dir: Path, tmp_path: Path, monkeypatch) -> None:
    builds: list = []
    _fake_engine_machinery(monkeypatch, builds)
    work = Path(shutil.copytree(export_dir, tmp_path / "export", ignore=shutil.ignore_patterns("engine*")))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_engine(work, "fp32", 2, cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 3 and builds == ["fp32"]
    assert sum(result.rebuilt for result in results) == 1
    assert len({json.dumps(result.manifest, sort_keys=True) for result in results}) == 1
