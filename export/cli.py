"""``incseg export``, ``incseg predict`` and ``incseg bench-runtime`` subcommands.

``add_subcommands`` registers them on the main CLI's subparsers; each handler takes the parsed namespace
and returns the process exit code (0 ok, 1 failed check or run, 2 bad input). ``predict`` on an export
directory runs without PyTorch; the other handlers import the training stack when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from export.manifest import is_export_dir
from export.processing import class_areas, mask_image, overlay
from export.runtime import BACKEND_CHOICES, BENCH_BACKENDS, ensure_export, open_runtime, resolve_backend
from training.data import DataError, load_image
from training.extra import require_train_extra

PREDICT_CHUNK = 8
PRECISION_CHOICES = ("auto", "fp32", "fp16", "int8")


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` (or a single side) -> (H, W); the argparse type of ``--size``."""
    parts = text.lower().split("x")
    try:
        height, width = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (HxW), got {text!r}") from None
    if len(parts) > 2 or min(height, width) < 32:
        raise argparse.ArgumentTypeError(f"size must be HxW with both sides >= 32, got {text!r}")
    return height, width


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``export``, ``predict`` and ``bench-runtime``; each sets ``func`` to its handler."""
    export = subparsers.add_parser(
        "export",
        help="export a model directory to ONNX (parity-checked), optionally build a TensorRT engine",
        description="Writes OUT/model.onnx and OUT/manifest.json after checking ONNX Runtime against PyTorch "
        "(max abs logit error <= 1e-3, argmax agreement >= 99.9 %); exits 1 when the check fails.",
    )
    export.add_argument("--model", type=Path, required=True, help="model directory")
    export.add_argument(
        "--size", type=parse_size, default=(512, 512), help="serving size HxW (default 512x512)"
    )
    export.add_argument("--out", type=Path, required=True, help="export directory to write")
    export.add_argument(
        "--fp16",
        action="store_true",
        help="also write model_fp16.onnx (FP16 weights, FP32 I/O) for GPU runtimes; "
        "with --trt, build an FP16 engine",
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="also write calibration.json (activation ranges, no image), model_int8.onnx (QDQ INT8 for ONNX "
        "Runtime CPU) and model_int8_trt.onnx (for TensorRT) from "
        "--calibration; its gate: argmax agreement with FP32 >= 99 %% and mIoU loss <= 1 point",
    )
    export.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="calibration images: a folder of images, or a dataset folder (calibrates on its training "
        "images, gates on its validation images and masks)",
    )
    export.add_argument(
        "--trt", action="store_true", help="also build a TensorRT engine on this GPU (INT8 with --int8)"
    )
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.set_defaults(func=run_export)

    predict = subparsers.add_parser(
        "predict",
        help="segment images; writes <stem>_mask.png and <stem>_overlay.png per image",
        description="Prints the share of pixels per class for each image. A model directory is exported "
        "into its cache MODEL_DIR/export-HxW/ first (ONNX backends). Images that cannot be decoded, or "
        "are larger than the decompression-bomb limit, are reported and skipped (exit code 2).",
    )
    predict.add_argument("--model", type=Path, required=True, help="model directory or export directory")
    predict.add_argument("images", type=Path, nargs="+", help="image files")
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    predict.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="runtime (default auto)")
    predict.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="serving size HxW (model directory only; default 512x512)",
    )
    predict.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="auto: FP16 on GPU backends, FP32 on CPU; int8: the export's INT8 model (ort-cpu, trt) when "
        "it passed its gate, else FP32 with the reason printed",
    )
    predict.set_defaults(func=run_predict)

    bench = subparsers.add_parser(
        "bench-runtime",
        help="per-image latency and throughput of each runtime backend",
        description="Times each backend at batch 1 and 4 and prints p50/p90 and the ratio to PyTorch eager.",
    )
    bench.add_argument("--model", type=Path, required=True, help="model directory or export directory")
    bench.add_argument("--size", type=parse_size, default=(512, 512), help="input size HxW (default 512x512)")
    bench.add_argument("--iters", type=int, default=20, help="timed iterations per backend and batch")
    bench.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    bench.add_argument(
        "--backends",
        nargs="+",
        choices=BENCH_BACKENDS,
        default=None,
        help="default: all available; ort-cpu-int8 / trt-int8 time the INT8 model",
    )
    bench.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="images to calibrate the INT8 model with when the export has none (as for export)",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of PyTorch and of ONNX Runtime (default: torch's default, physical cores for ORT)",
    )
    bench.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    bench.set_defaults(func=run_bench_runtime)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``incseg export``."""
    require_train_extra("incseg export")
    from export.int8 import load_calibration
    from export.onnx_export import export_onnx
    from export.parity import ParityError
    from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from training.model_dir import read_model_file

    if args.int8 != (args.calibration is not None):
        return _fail("--int8 and --calibration DIR go together", 2)
    console = Console()
    try:
        int8 = None
        if args.int8:
            classes = read_model_file(args.model).classes
            int8 = load_calibration(args.calibration, classes, args.size, IMAGENET_MEAN, IMAGENET_STD)
        result = export_onnx(args.model, args.out, args.size, fp16=args.fp16, opset=args.opset, int8=int8)
    except ParityError as error:
        return _fail(f"{error}; nothing was written to {args.out}", 1)
    except (FileNotFoundError, ValueError) as error:  # DataError is a ValueError
        return _fail(str(error), 2)
    console.print(f"exported {result.onnx_path} ({', '.join(result.manifest['classes'])})")
    console.print(f"parity: {result.parity.summary()}")
    if result.fp16_path:
        console.print(f"fp16: {result.fp16_path} (argmax agreement with FP32 checked on ONNX Runtime CPU)")
    int8_entry = result.manifest["int8"]
    for target in ("cpu", "tensorrt") if int8_entry is not None else ():
        model = int8_entry[target]
        verdict = "served with --precision int8" if model["passed"] else "NOT served: FP32 serves instead"
        console.print(f"int8 ({target}): {model['file']} ({model['parity']['summary']}); {verdict}")
    if args.trt:
        from export.tensorrt_engine import ensure_engine

        int8_passed = int8_entry is not None and int8_entry["tensorrt"]["passed"]
        precision = "int8" if int8_passed else "fp16" if args.fp16 else "fp32"
        try:
            build = ensure_engine(result.out_dir, precision)
        except ParityError as error:
            return _fail(f"TensorRT engine rejected: {error}", 1)
        except RuntimeError as error:
            return _fail(str(error), 1)
        manifest = build.manifest
        console.print(
            f"TensorRT engine {build.engine_path} ({manifest['precision']}, {manifest['gpu_name']})"
        )
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Handler of ``incseg predict``."""
    console = Console()
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        return _fail(f"no such image: {', '.join(missing)}", 2)
    if args.model.exists() and not is_export_dir(args.model):
        require_train_extra("incseg predict on a model directory (not an export directory)")
    try:
        model = args.model
        if not is_export_dir(model) and resolve_backend(args.backend) != "torch":
            model = ensure_export(model, args.size, fp16=resolve_backend(args.backend) != "ort-cpu")
        fp16, int8 = args.precision in ("auto", "fp16"), args.precision == "int8"
        runtime = open_runtime(model, args.backend, args.size, fp16=fp16, int8=int8)
    except (FileNotFoundError, ValueError) as error:  # InvalidExportError, DataError are ValueErrors
        return _fail(str(error), 2)
    args.out.mkdir(parents=True, exist_ok=True)
    console.print(f"model {runtime.version} on {runtime.backend} ({runtime.precision}), input {runtime.size}")
    if runtime.fallback is not None:
        console.print(f"INT8 not served: {runtime.fallback}")
    unreadable = []
    with runtime:
        for start in range(0, len(args.images), PREDICT_CHUNK):
            paths, images = [], []
            for path in args.images[start : start + PREDICT_CHUNK]:
                try:
                    images.append(np.asarray(load_image(path)))  # (h, w, 3) uint8
                except DataError as error:
                    print(f"error: {error}", file=sys.stderr)
                    unreadable.append(path)
                    continue
                paths.append(path)
            for path, image, labels in zip(paths, images, runtime.predict(images), strict=True):
                mask_image(labels).save(args.out / f"{path.stem}_mask.png")
                Image.fromarray(overlay(image, labels)).save(args.out / f"{path.stem}_overlay.png")
                areas = class_areas(labels, runtime.classes)
                summary = ", ".join(f"{name} {share:.1f} %" for name, share in areas.items())
                console.print(f"{path.name} ({image.shape[1]}x{image.shape[0]}): {summary}")
    if unreadable:
        return _fail(f"{len(unreadable)} of {len(args.images)} images could not be read (see above)", 2)
    return 0


def run_bench_runtime(args: argparse.Namespace) -> int:
    """Handler of ``incseg bench-runtime``."""
    require_train_extra("incseg bench-runtime")
    from export.benchmark import benchmark_runtimes

    try:
        report = benchmark_runtimes(
            args.model,
            args.size,
            args.iters,
            tuple(args.batches),
            args.backends,
            calibration=args.calibration,
            threads=args.threads,
        )
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error), 2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0
