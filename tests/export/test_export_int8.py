"""INT8: the calibration table (ranges, no images), quantisation from it alone, the INT8 gate, the export's
INT8 entry, serving INT8 or falling back to FP32, and the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import TensorData, TensorsData
from PIL import Image

from export import tensorrt_engine
from export.benchmark import benchmark_runtimes
from export.cli import add_subcommands
from export.int8 import (
    IGNORE_LABEL,
    TENSORRT_SCHEME,
    Int8Calibration,
    compare_int8,
    compute_table,
    load_calibration,
    mean_iou,
    merge_tables,
    quantize_from_table,
    read_table,
    write_table,
)
from export.manifest import (
    CALIBRATION_FILE,
    ONNX_INT8_FILE,
    ONNX_INT8_TRT_FILE,
    InvalidExportError,
    read_manifest,
)
from export.onnx_export import export_onnx
from export.runtime import OrtRuntime, open_runtime
from export.tensorrt_engine import engine_source, ensure_engine, serving_precision, tensorrt_available
from tests.helpers import make_int8_fragile, save_tiny_model
from training.data import write_synthetic_dataset
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from training.metrics import ConfusionMatrix, SegmentationScores
from training.model_dir import ModelBundle
from training.step import run_step
from training.trainer import StepOptions

SIZE = (48, 48)


def _table(ranges: dict[str, tuple[float, float]]) -> TensorsData:
    data = {
        name: TensorData(lowest=np.float32(low), highest=np.float32(high))
        for name, (low, high) in ranges.items()
    }
    return TensorsData(CalibrationMethod.MinMax, data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synth_dataset: Path) -> ModelBundle:
    """A tiny model trained a few epochs: its argmax depends on the image (a random one is constant)."""
    options = StepOptions(
        epochs=3,
        batch_size=4,
        size=48,
        backbone="resnet10",
        context_channels=16,
        embed_channels=16,
        workers=0,
        min_iterations=0,
    )
    torch.manual_seed(0)
    bundle, _ = run_step(None, synth_dataset, "ft", options, tmp_path_factory.mktemp("int8") / "model")
    return bundle


@pytest.fixture(scope="module")
def calibration(trained: ModelBundle, synth_dataset: Path) -> Int8Calibration:
    return load_calibration(synth_dataset, trained.classes, SIZE, IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory, trained: ModelBundle, calibration: Int8Calibration):
    return export_onnx(trained, tmp_path_factory.mktemp("int8-export") / "export", SIZE, int8=calibration)


@pytest.fixture(scope="module")
def failing_export(tmp_path_factory: pytest.TempPathFactory, synth_dataset: Path):
    """A model whose classes 1 and 2 differ by a hair: INT8 rounding flips the argmax between them."""
    path = save_tiny_model(tmp_path_factory.mktemp("fragile") / "model", ["background", "a", "b"])
    bundle = ModelBundle.load(path)
    make_int8_fragile(bundle.model)
    calibration = load_calibration(synth_dataset, bundle.classes, SIZE, IMAGENET_MEAN, IMAGENET_STD)
    return export_onnx(bundle, tmp_path_factory.mktemp("int8-fail") / "export", SIZE, int8=calibration)


def test_merge_is_the_union_of_the_ranges() -> None:
    merged = merge_tables(
        [_table({"a": (-1.0, 2.0), "b": (0.0, 1.0)}), _table({"a": (-3.0, 1.5), "c": (0.5, 4.0)})]
    )
    got = {name: tuple(float(v) for v in entry.range_value) for name, entry in merged.items()}
    assert got == {"a": (-3.0, 2.0), "b": (0.0, 1.0), "c": (0.5, 4.0)}


def test_table_round_trips_and_holds_one_range_per_tensor(tmp_path: Path, int8_export) -> None:
    table_path = int8_export.out_dir / CALIBRATION_FILE
    data = json.loads(table_path.read_text())["data"]
    assert data and all(set(entry) == {"lowest", "highest", "CLS"} for entry in data.values())
    assert all(len(entry["lowest"]["data"]) == len(entry["highest"]["data"]) == 1 for entry in data.values())
    write_table(read_table(table_path), tmp_path / "again.json")
    assert read_table(tmp_path / "again.json").data.keys() == data.keys()


def test_quantises_from_the_table_alone_with_the_symmetric_scale(tmp_path: Path, int8_export) -> None:
    table = read_table(int8_export.out_dir / CALIBRATION_FILE)
    table.data["images"] = TensorData(lowest=np.float32(-3.0), highest=np.float32(2.0))  # the graph input
    write_table(table, tmp_path / "table.json")
    quantize_from_table(
        int8_export.onnx_path, tmp_path / "table.json", tmp_path / "int8.onnx", TENSORRT_SCHEME
    )
    model = onnx.load(str(tmp_path / "int8.onnx"))
    initializers = {item.name: numpy_helper.to_array(item) for item in model.graph.initializer}
    quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "images")
    # onnxruntime 1.32 quantization/quant_utils.py:276-285 (compute_scale_zp, symmetric): absmax = max(|rmin|,
    # |rmax|), scale = 2 * absmax / (qmax - qmin) with the symmetric INT8 range [-127, 127]; zero point 0
    assert initializers[quantize.input[1]] == pytest.approx(2 * 3.0 / 254)
    assert initializers[quantize.input[2]].dtype == np.int8 and initializers[quantize.input[2]] == 0


def test_mean_iou_matches_the_training_metric() -> None:
    rng = np.random.default_rng(0)
    predictions = [rng.integers(0, 4, (2, 6, 5)), rng.integers(0, 4, (1, 6, 5))]
    labels = [rng.integers(0, 4, (2, 6, 5)), rng.integers(0, 3, (1, 6, 5))]
    labels[0][0, 0, :] = IGNORE_LABEL
    confusion = ConfusionMatrix(4)
    for predicted, truth in zip(predictions, labels, strict=True):
        confusion.update(torch.from_numpy(predicted), torch.from_numpy(truth.astype(np.int64)))
    expected = SegmentationScores.from_confusion(confusion, ["a", "b", "c", "d"], 4).miou_all
    assert expected is not None  # None only where no class occurs
    assert mean_iou(predictions, labels, 4) == pytest.approx(100 * expected)


def test_gate_on_hand_made_logits() -> None:
    fp32 = np.zeros((1, 2, 2, 2), np.float32)  # (N, C, H, W): class 1 on the top row
    fp32[0, 1, 0, :] = 1.0
    int8 = fp32.copy()
    int8[0, 1, 0, 1] = -1.0  # one of four pixels flips to class 0
    labels = np.array([[[1, 1], [0, IGNORE_LABEL]]], np.uint8)
    report = compare_int8([fp32], [int8], [labels])
    # fp32: class 0 IoU 1/1, class 1 IoU 2/2 -> 100; int8: class 0 IoU 1/2, class 1 IoU 1/2 -> 50
    assert report.argmax_agreement == 0.75 and report.images == 1
    assert (report.miou_fp32, report.miou_int8, report.miou_loss) == (100.0, 50.0, 50.0)
    assert not report.passed
    assert compare_int8([fp32], [fp32], [labels]).passed
    unlabelled = compare_int8([fp32], [fp32], None)
    assert unlabelled.passed and unlabelled.miou_loss is None and "not measured" in unlabelled.summary()
    with pytest.raises(ValueError, match="label 5 but the model has 2 classes"):
        compare_int8([fp32], [fp32], [np.full((1, 2, 2), 5, np.uint8)])


def _zero_points(path: Path) -> set[np.dtype]:
    """dtypes of the zero points of the activation QuantizeLinear nodes."""
    model = onnx.load(str(path))
    initializers = {item.name: numpy_helper.to_array(item) for item in model.graph.initializer}
    return {
        initializers[node.input[2]].dtype for node in model.graph.node if node.op_type == "QuantizeLinear"
    }


def test_export_writes_the_int8_models_their_table_and_their_gates(int8_export) -> None:
    manifest = read_manifest(int8_export.out_dir)
    entry = manifest.int8
    assert entry is not None and entry.table == CALIBRATION_FILE
    assert (entry.cpu.file, entry.tensorrt.file) == (ONNX_INT8_FILE, ONNX_INT8_TRT_FILE)
    assert int8_export.int8_path == int8_export.out_dir / ONNX_INT8_FILE
    assert entry.calibration["method"] == "MinMax" and entry.calibration["images"] > 0
    for model in (entry.cpu, entry.tensorrt):
        assert model.passed and model.parity["argmax_agreement"] >= 0.99 and model.parity["miou_loss"] <= 1.0
    ops = {node.op_type for node in onnx.load(str(int8_export.int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # ONNX Runtime CPU: UINT8 activations; TensorRT: INT8 activations (zero point 0, checked below)
    assert _zero_points(int8_export.out_dir / ONNX_INT8_FILE) == {np.dtype(np.uint8)}
    assert _zero_points(int8_export.out_dir / ONNX_INT8_TRT_FILE) == {np.dtype(np.int8)}
    with open_runtime(int8_export.out_dir, "ort-cpu", int8=True) as runtime:
        assert runtime.precision == "int8" and runtime.fallback is None
        labels = runtime.predict([np.zeros((30, 40, 3), np.uint8)])
        assert labels[0].shape == (30, 40)
    with open_runtime(int8_export.out_dir, "ort-cpu") as runtime:
        assert runtime.precision == "fp32"


def test_a_failing_int8_model_is_kept_but_fp32_serves(failing_export) -> None:
    entry = read_manifest(failing_export.out_dir).int8
    assert entry is not None and not entry.cpu.passed and not entry.tensorrt.passed
    assert entry.cpu.parity["argmax_agreement"] < 0.99
    assert failing_export.parity.passed, "FP32 itself matches PyTorch"
    with open_runtime(failing_export.out_dir, "ort-cpu", int8=True) as runtime:
        assert runtime.precision == "fp32"
        assert runtime.fallback is not None and "model_int8.onnx failed the gate" in runtime.fallback


def test_int8_model_file_is_checked_against_its_hash(tmp_path: Path, int8_export) -> None:
    copy = tmp_path / "export"
    copy.mkdir()
    for path in int8_export.out_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / ONNX_INT8_FILE).write_bytes(b"not a model")
    with pytest.raises(InvalidExportError, match="model_int8.onnx: sha256"):
        OrtRuntime(copy, int8=True)
    assert OrtRuntime(copy).precision == "fp32"  # the FP32 model is intact


def test_export_without_int8_has_no_entry_and_serves_fp32(tmp_path: Path, trained: ModelBundle) -> None:
    result = export_onnx(trained, tmp_path / "export", SIZE)
    assert result.manifest["int8"] is None and not (tmp_path / "export" / CALIBRATION_FILE).exists()
    with open_runtime(result.out_dir, "ort-cpu", int8=True) as runtime:
        assert runtime.precision == "fp32"
        assert runtime.fallback is not None and "no INT8 model" in runtime.fallback


def test_calibration_from_a_dataset_maps_labels_by_name(synth_dataset: Path) -> None:
    classes = ["background", "red_circle_plain", "azure_square_striped"]  # the dataset's first two classes
    loaded = load_calibration(synth_dataset, classes, SIZE, IMAGENET_MEAN, IMAGENET_STD, limit=6)
    assert loaded.calibration.count == 6 and loaded.evaluation.count == 6
    assert loaded.evaluation.labels is not None
    values = set(np.unique(np.concatenate([item.ravel() for item in loaded.evaluation.labels])).tolist())
    assert values <= {0, 1, 2, IGNORE_LABEL} and {1, 2} & values


def test_calibration_from_a_weak_dataset_gates_on_the_val_masks(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "weak", 2, 4, 3, 32, seed=0, weak_train=True)
    classes = (data / "classes.txt").read_text().split()
    loaded = load_calibration(data, classes, SIZE, IMAGENET_MEAN, IMAGENET_STD)
    assert (loaded.calibration.count, loaded.calibration.labels) == (4, None)  # labels.csv: no masks
    assert loaded.evaluation.count == 3 and loaded.evaluation.labels is not None
    (data / "splits" / "val.txt").write_text("")  # no val split: the gate runs on the weak training images
    assert load_calibration(data, classes, SIZE, IMAGENET_MEAN, IMAGENET_STD).evaluation.labels is None


def test_calibration_from_a_folder_of_images_has_no_labels(tmp_path: Path) -> None:
    for index in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * index, np.uint8)).save(tmp_path / f"{index}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_calibration(tmp_path, ["background"], SIZE, IMAGENET_MEAN, IMAGENET_STD)
    assert loaded.calibration.count == 3 and loaded.evaluation.labels is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_calibration(tmp_path / "missing", ["background"], SIZE, IMAGENET_MEAN, IMAGENET_STD)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image"):
        load_calibration(tmp_path / "empty", ["background"], SIZE, IMAGENET_MEAN, IMAGENET_STD)


def test_compute_table_observes_the_calibration_images(int8_export, calibration: Int8Calibration) -> None:
    table = compute_table(int8_export.onnx_path, calibration.calibration.batches)
    low, high = (float(np.ravel(value)[0]) for value in table["images"].range_value)
    inputs = np.concatenate(calibration.calibration.batches)
    assert (low, high) == pytest.approx((float(inputs.min()), float(inputs.max())))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="incseg")
    add_subcommands(parser.add_subparsers(required=True))
    return parser


def test_cli_export_int8_then_predict_int8(
    tmp_path: Path, trained: ModelBundle, synth_dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    model_dir = tmp_path / "model"
    trained.save(model_dir)
    out = tmp_path / "export"
    args = _parser().parse_args(
        ["export", "--model", str(model_dir), "--size", "48x48", "--out", str(out), "--int8"]
    )
    assert args.func(args) == 2 and "go together" in capsys.readouterr().err
    argv = ["export", "--model", str(model_dir), "--size", "48x48", "--out", str(out)]
    args = _parser().parse_args([*argv, "--int8", "--calibration", str(synth_dataset)])
    assert args.func(args) == 0
    assert (out / ONNX_INT8_FILE).is_file() and (out / CALIBRATION_FILE).is_file()
    assert "served with --precision int8" in capsys.readouterr().out
    image = next((synth_dataset / "images").glob("*.png"))
    args = _parser().parse_args(
        ["predict", "--model", str(out), "--precision", "int8", "--out", str(tmp_path / "pred"), str(image)]
    )
    assert args.func(args) == 0
    assert "(int8)" in capsys.readouterr().out and (tmp_path / "pred" / f"{image.stem}_mask.png").is_file()


def test_bench_runtime_times_int8_beside_fp32_and_torch(
    tmp_path: Path, trained: ModelBundle, synth_dataset: Path
) -> None:
    model_dir = tmp_path / "model"
    trained.save(model_dir)
    backends = ["torch", "ort-cpu", "ort-cpu-int8"]
    report = benchmark_runtimes(model_dir, SIZE, 2, (1,), backends, calibration=synth_dataset)
    assert set(report["backends"]) == set(backends) and set(report["ratios_vs_torch"]) == set(backends[1:])
    int8 = report["backends"]["ort-cpu-int8"]
    assert int8["precision"] == "int8" and int8["int8_gate"]["passed"] and int8["fallback"] is None
    assert report["backends"]["ort-cpu"]["precision"] == "fp32"
    with pytest.raises(ValueError, match="needs calibration images"):
        benchmark_runtimes(tmp_path / "other", SIZE, 1, (1,), ["ort-cpu-int8"])


def test_tensorrt_builds_int8_from_its_symmetric_model_when_it_passed(
    int8_export, failing_export, tmp_path: Path, trained: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensorrt_engine, "fp16_builder_flag_available", lambda: True)  # TensorRT 10
    assert engine_source(int8_export.out_dir, "int8") == int8_export.out_dir / ONNX_INT8_TRT_FILE
    assert serving_precision(int8_export.out_dir, True, int8=True) == "int8"
    assert serving_precision(failing_export.out_dir, True, int8=True) == "fp16"  # its gate failed
    assert serving_precision(int8_export.out_dir, True) == "fp16"
    plain = export_onnx(trained, tmp_path / "export", SIZE).out_dir
    with pytest.raises(FileNotFoundError, match="--int8"):
        engine_source(plain, "int8")


@pytest.mark.skipif(not tensorrt_available(), reason="needs the tensorrt package and a CUDA GPU")
def test_real_int8_engine_build_and_inference(int8_export, tmp_path: Path) -> None:
    from export.runtime import TensorRTRuntime

    build = ensure_engine(int8_export.out_dir, "int8", 4, cache_dir=tmp_path, force=True)
    assert build.manifest["precision"] == "int8" and build.manifest["onnx_file"] == ONNX_INT8_TRT_FILE
    assert build.manifest["parity"]["argmax_agreement"] >= 0.99
    with TensorRTRuntime(int8_export.out_dir, fp16=True, max_batch=4, int8=True) as runtime:
        assert runtime.precision == "int8" and runtime.fallback is None
        assert [mask.shape for mask in runtime.predict([np.zeros((50, 70, 3), np.uint8)] * 5)] == [
            (50, 70)
        ] * 5
