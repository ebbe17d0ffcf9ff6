"""ONNX export round trip: class growth, plain onnxruntime parity, manifest, dynamic batch, odd sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from export.manifest import ONNX_FP16_FILE, file_sha256, is_export_dir
from export.onnx_export import export_onnx
from tests.helpers import save_tiny_model
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig

SIZE = (97, 131)
CLASSES = ["background", "cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export-onnx") / "model"
    return save_tiny_model(path, CLASSES, grow=2, history=[{"step": 0}, {"step": 1}])


@pytest.fixture(scope="module")
def exported(model_dir: Path):
    return export_onnx(model_dir, model_dir.parent / "export", SIZE, fp16=True)


def test_output_has_the_grown_class_count(exported) -> None:
    graph = onnx.load(str(exported.onnx_path)).graph
    dims = graph.output[0].type.tensor_type.shape.dim
    assert graph.output[0].name == "logits"
    assert [d.dim_value for d in dims[1:]] == [len(CLASSES), *SIZE]
    assert dims[0].dim_param  # symbolic batch
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # standard ops only


def test_plain_onnxruntime_matches_torch_at_batch_1_and_3(exported, model_dir: Path) -> None:
    session = onnxruntime.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    model = ModelBundle.load(model_dir, aux=False).model.eval()
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        images = rng.standard_normal((batch, 3, *SIZE), dtype=np.float32)
        (logits,) = session.run(None, {"images": images})
        with torch.inference_mode():
            reference = model(torch.from_numpy(images)).numpy()
        assert logits.shape == (batch, len(CLASSES), *SIZE)
        assert np.abs(logits - reference).max() < 1e-3
        assert np.array_equal(logits.argmax(1), reference.argmax(1))


def test_manifest_fields(exported, model_dir: Path) -> None:
    manifest = json.loads(exported.manifest_path.read_text())
    assert manifest == exported.manifest
    assert manifest["classes"] == CLASSES
    assert manifest["input_size"] == list(SIZE)
    assert manifest["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert manifest["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert manifest["opset"] == 17
    assert manifest["onnx_sha256"] == file_sha256(exported.onnx_path)
    assert manifest["model_version"] == 2
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "incseg"}
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_error"] <= 1e-3
    assert [entry["batch"] for entry in manifest["parity"]["per_batch"]] == [1, 2, 4]
    assert manifest["source"]["model_dir"] == str(model_dir.resolve())
    assert manifest["created_at"]
    assert onnx.load(str(exported.onnx_path)).opset_import[0].version == 17
    assert is_export_dir(exported.out_dir)


def test_fp16_variant_keeps_float32_io_and_agrees(exported) -> None:
    fp16 = exported.out_dir / ONNX_FP16_FILE
    assert exported.fp16_path == fp16
    assert exported.manifest["fp16"]["sha256"] == file_sha256(fp16)
    assert exported.manifest["fp16"]["parity"]["argmax_agreement"] >= 0.995
    proto = onnx.load(str(fp16))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    images = np.random.default_rng(2).standard_normal((2, 3, *SIZE), dtype=np.float32)
    full = onnxruntime.InferenceSession(str(exported.onnx_path)).run(None, {"images": images})[0]
    half = onnxruntime.InferenceSession(str(fp16)).run(None, {"images": images})[0]
    assert half.dtype == np.float32
    assert (full.argmax(1) == half.argmax(1)).mean() >= 0.995


def test_bundle_object_is_accepted(tmp_path: Path) -> None:
    model = BiSeNet(BiSeNetConfig(num_classes=2, backbone="resnet10", context_channels=8, embed_channels=8))
    result = export_onnx(
        ModelBundle(model, ["background", "thing"]), tmp_path / "out", (32, 48), parity_batches=(2,)
    )
    assert result.manifest["source"]["model_dir"] is None
    assert result.manifest["model_version"] == 0
    session = onnxruntime.InferenceSession(str(result.onnx_path))
    assert session.run(None, {"images": np.zeros((1, 3, 32, 48), np.float32)})[0].shape == (1, 2, 32, 48)
