"""Which INT8 scheme for ONNX Runtime CPU: one all-class MinMax table, five ways to quantise from it.

Symmetric or asymmetric (UINT8) activations, 7-bit weights (``reduce_range``) or not, and the classifier
with the final Resize left in FP32 or not; each INT8 model is compared with FP32 on every validation
image (argmax agreement, mIoU loss in points). Used to choose ``export.int8.CPU_SCHEME``.

Usage (BENCHMARKS.md, "INT8")::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_schemes.py MODEL_DIR DATA_DIR SIZE OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from export.int8 import compare_int8, compute_table, load_calibration, write_table
from export.onnx_export import export_onnx
from export.parity import run_onnx
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from training.model_dir import read_model_file

HEAD_IN_FP32 = ["/classifier/Conv", "/Resize"]
SYMMETRIC = {"ActivationSymmetric": True, "WeightSymmetric": True}
ASYMMETRIC = {"WeightSymmetric": True}
VARIANTS = {
    "int8 symmetric activations": {"activation_type": QuantType.QInt8, "extra_options": SYMMETRIC},
    "int8 symmetric, head in fp32": {
        "activation_type": QuantType.QInt8,
        "extra_options": SYMMETRIC,
        "nodes_to_exclude": HEAD_IN_FP32,
    },
    "uint8 asymmetric activations": {"activation_type": QuantType.QUInt8, "extra_options": ASYMMETRIC},
    "uint8 asymmetric, 7-bit weights": {
        "activation_type": QuantType.QUInt8,
        "extra_options": ASYMMETRIC,
        "reduce_range": True,
    },
    "uint8 asymmetric, head in fp32": {
        "activation_type": QuantType.QUInt8,
        "extra_options": ASYMMETRIC,
        "nodes_to_exclude": HEAD_IN_FP32,
    },
}


def main(model_dir: Path, data_dir: Path, side: int, out: Path) -> None:
    size = (side, side)
    classes = read_model_file(model_dir).classes
    calibration = load_calibration(data_dir, classes, size, IMAGENET_MEAN, IMAGENET_STD)
    every_image = load_calibration(data_dir, classes, size, IMAGENET_MEAN, IMAGENET_STD, limit=10_000)
    evaluation = every_image.evaluation  # the whole validation split
    results = {}
    with tempfile.TemporaryDirectory(prefix="int8-schemes-") as tmp:
        export = export_onnx(model_dir, Path(tmp) / "export", size)
        table_path, int8_path = Path(tmp) / "table.json", Path(tmp) / "int8.onnx"
        write_table(compute_table(export.onnx_path, calibration.calibration.batches), table_path)
        fp32 = run_onnx(export.onnx_path, evaluation.batches)
        for name, options in VARIANTS.items():
            quantize_static(
                str(export.onnx_path),
                str(int8_path),
                None,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(table_path),
                **options,
            )
            report = compare_int8(fp32, run_onnx(int8_path, evaluation.batches), evaluation.labels)
            results[name] = report.to_dict()
            print(f"{name}: {report.summary()}", flush=True)
    summary = {"model_dir": str(model_dir), "size": list(size), "evaluation_images": evaluation.count}
    out.write_text(json.dumps({**summary, "results": results}, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
