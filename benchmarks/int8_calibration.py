"""What calibrating INT8 on a step's new-class images alone costs, and whether merging tables fixes it.

One trained model is exported once (FP32, ONNX Runtime CPU); each condition measures a calibration table on
a set of training images, quantises the model from the table alone (``export.int8``, both schemes: ONNX
Runtime CPU's and TensorRT's) and compares INT8 with FP32 on every validation image (all classes): argmax
agreement, mIoU of both, mIoU loss. Conditions:

- ``all``: images spread over the whole training split (every class), the reference;
- ``new K-20``: only images whose objects all belong to classes K..20 (a disjoint step adding K..20);
- ``new K-20 + merged``: that table merged with the table of images of classes 1..K-1 only (the earlier
  version's table: what the worker merges, keeping no image);
- ``with 20``: images showing class 20 among others (an overlapped 15-1 step);
- ``all (percentile)``, ``all (entropy)``: the reference images with ONNX Runtime's other calibration
  methods, to choose the method.

Usage (BENCHMARKS.md, "INT8")::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_calibration.py MODEL_DIR DATA_DIR SIZE OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationMethod

from export.int8 import (
    SCHEMES,
    LabelledBatches,
    compare_int8,
    compute_table,
    merge_tables,
    quantize_from_table,
    write_table,
)
from export.onnx_export import export_onnx
from export.parity import run_onnx
from training.data import load_image, read_source
from training.data.sources import load_mask
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CALIBRATION_IMAGES = 32


def main(model_dir: Path, data_dir: Path, side: int, out: Path) -> None:
    size = (side, side)
    source = read_source(data_dir)
    count = len(source.classes)
    masks = {sample.stem: load_mask(sample, count) for sample in (*source.train, *source.val)}
    labels = {stem: set(np.unique(mask).tolist()) - {0, 255} for stem, mask in masks.items()}

    def batches(samples: list) -> LabelledBatches:
        images = [np.asarray(load_image(sample.image_path)) for sample in samples]
        return LabelledBatches.from_images(images, [masks[s.stem] for s in samples], size, *NORM)

    def spread(samples: list) -> list:
        if len(samples) <= CALIBRATION_IMAGES:
            return samples
        return [samples[int(i)] for i in np.linspace(0, len(samples) - 1, CALIBRATION_IMAGES)]

    def only(low: int, high: int) -> list:
        return spread(
            [s for s in source.train if labels[s.stem] and labels[s.stem] <= set(range(low, high + 1))]
        )

    sets = {
        "all": spread(list(source.train)),
        "new 11-20": only(11, 20),
        "old 1-10": only(1, 10),
        "new 16-20": only(16, 20),
        "old 1-15": only(1, 15),
        "with 20": spread([s for s in source.train if 20 in labels[s.stem]]),
    }
    evaluation = batches(list(source.val))
    with tempfile.TemporaryDirectory(prefix="int8-calibration-") as tmp:
        export = export_onnx(model_dir, Path(tmp) / "export", size)
        fp32 = run_onnx(export.onnx_path, evaluation.batches)
        tables = {}
        for name, samples in sets.items():
            started = time.perf_counter()
            tables[name] = compute_table(export.onnx_path, batches(samples).batches)
            print(
                f"{name}: {len(samples)} images, table in {time.perf_counter() - started:.1f} s", flush=True
            )
        for method in (CalibrationMethod.Percentile, CalibrationMethod.Entropy):
            tables[f"all ({method.name.lower()})"] = compute_table(
                export.onnx_path, batches(sets["all"]).batches, method
            )
        tables["new 11-20 + merged"] = merge_tables([tables["new 11-20"], tables["old 1-10"]])
        tables["new 16-20 + merged"] = merge_tables([tables["new 16-20"], tables["old 1-15"]])
        results = {}
        for name, table in tables.items():
            if name.startswith("old"):
                continue
            table_path, int8_path = Path(tmp) / "table.json", Path(tmp) / "int8.onnx"
            write_table(table, table_path)
            images = len(sets.get(name.split(" (")[0].removesuffix(" + merged"), []))
            results[name] = {"calibration_images": images}
            for scheme in SCHEMES:
                quantize_from_table(export.onnx_path, table_path, int8_path, scheme)
                report = compare_int8(fp32, run_onnx(int8_path, evaluation.batches), evaluation.labels)
                results[name][scheme.target] = {**report.to_dict(), "quantization": scheme.description}
                print(f"{name}, {scheme.target}: {report.summary()}", flush=True)
    out.write_text(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "data_dir": str(data_dir),
                "size": list(size),
                "evaluation_images": evaluation.count,
                "results": results,
            },
            indent=2,
        )
    )


NORM = (IMAGENET_MEAN, IMAGENET_STD)

if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
