"""Latency and throughput of every runtime backend on one model, in one run.

Each backend is opened (exporting into the model directory's cache or building first, untimed), warmed
up, then timed on ``predict_logits`` (forward pass plus logits back on the host) of a fixed random
normalised batch per batch size. PyTorch
eager runs under ``torch.inference_mode()`` with torch's default thread count; ONNX Runtime CPU uses one
intra-op thread per physical core. ``<backend>-int8`` times the export's INT8 model on that backend (made from
the ``calibration`` folder when the export has none) and reports its INT8 gate figures beside the times.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from export.manifest import is_export_dir, read_manifest
from export.runtime import INT8_SUFFIX, available_backends, ensure_export, open_runtime, physical_cores
from training.model_dir import is_model_dir

WARMUP_ITERATIONS = 3


def describe_device() -> dict:
    """CPU model, cores and threads, and the GPU when one is visible."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _time_backend(
    name: str,
    model: Path,
    size: tuple[int, int],
    iters: int,
    inputs: dict[int, np.ndarray],
    calibration: Path | None,
    threads: int | None,
) -> dict:
    backend, int8 = name.removesuffix(INT8_SUFFIX), name.endswith(INT8_SUFFIX)
    if int8 and calibration is None and not is_export_dir(model):
        raise ValueError(f"{name} needs calibration images (--calibration DIR) to quantise {model}")
    source = (
        model
        if backend == "torch"
        else ensure_export(model, size, fp16=backend != "ort-cpu", calibration=calibration if int8 else None)
    )
    runtime = open_runtime(source, backend, size, int8=int8, threads=threads)
    int8_entry = read_manifest(source).int8 if int8 else None
    int8_model = getattr(int8_entry, "tensorrt" if backend == "trt" else "cpu") if int8_entry else None
    try:
        runtime.warmup()
        per_batch = {}
        for batch_size, batch in inputs.items():
            for _ in range(WARMUP_ITERATIONS):
                runtime.predict_logits(batch)
            seconds = []
            for _ in range(iters):
                start = time.perf_counter()
                runtime.predict_logits(batch)
                seconds.append(time.perf_counter() - start)
            per_image_ms = np.asarray(seconds) * 1000 / batch_size
            per_batch[str(batch_size)] = {
                "p50_ms": float(np.percentile(per_image_ms, 50)),
                "p90_ms": float(np.percentile(per_image_ms, 90)),
                "images_per_s": batch_size * iters / float(np.sum(seconds)),
            }
        return {
            "batch": per_batch,
            "version": runtime.version,
            "precision": runtime.precision,
            "fallback": runtime.fallback,
            "int8_gate": int8_model.parity if int8_model is not None else None,
        }
    finally:
        runtime.close()


def benchmark_runtimes(
    model: Path,
    size: tuple[int, int] = (512, 512),
    iters: int = 20,
    batches: Sequence[int] = (1, 4),
    backends: Sequence[str] | None = None,
    console: Console | None = None,
    calibration: Path | None = None,
    threads: int | None = None,
) -> dict:
    """Times each backend at each batch size and prints a table with ratios against PyTorch eager.

    Args:
        model: Model directory (all backends) or export directory (no torch backend).
        size: Input (H, W); must match an export directory's size.
        iters: Timed iterations per backend and batch size.
        batches: Batch sizes.
        backends: Names from :data:`export.runtime.BENCH_BACKENDS` (default: every backend available here;
            torch only for a model directory).
        console: Where to print the table (default: a new rich console on stdout).
        calibration: Images to calibrate an INT8 model with when an ``-int8`` backend needs one.
        threads: Threads of PyTorch and of each ONNX Runtime session (default: torch's own, physical cores).

    Returns:
        ``{"backends": {NAME: {"batch": {"1": {"p50_ms", "p90_ms", "images_per_s"}, ...}, "version",
        "precision", "fallback", "int8_gate"}}, "size": [H, W], "iters", "measure", "device": {...},
        "ratios_vs_torch": {NAME: {"1": p50 / torch p50, ...}}}`` (per-image latencies in ms).
    """
    model = Path(model)
    if backends is None:
        backends = [name for name in available_backends() if name != "torch" or is_model_dir(model)]
    if "torch" in backends and is_export_dir(model) and not is_model_dir(model):
        raise ValueError(f"{model} is an export directory; the torch backend needs the model directory")
    rng = np.random.default_rng(0)
    inputs = {batch: rng.standard_normal((batch, 3, *size), dtype=np.float32) for batch in batches}
    if threads is not None:
        torch.set_num_threads(threads)
    results = {
        name: _time_backend(name, model, size, iters, inputs, calibration, threads) for name in backends
    }
    ratios = {}
    if "torch" in results:
        reference = results["torch"]["batch"]
        ratios = {
            name: {key: entry["p50_ms"] / reference[key]["p50_ms"] for key, entry in result["batch"].items()}
            for name, result in results.items()
            if name != "torch"
        }
    report = {
        "backends": results,
        "size": list(size),
        "iters": iters,
        "measure": "predict_logits: forward pass + logits to host, per image",
        "device": describe_device(),
        "ort_threads": threads or physical_cores(),
        "ratios_vs_torch": ratios,
    }
    _print_table(report, console or Console())
    return report


def _print_table(report: dict, console: Console) -> None:
    size = report["size"]
    table = Table(title=f"Runtime latency per image at {size[0]}x{size[1]} ({report['iters']} iterations)")
    for column in ("backend", "batch", "p50 ms", "p90 ms", "images/s", "p50 vs torch"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for name, result in report["backends"].items():
        for batch, entry in result["batch"].items():
            ratio = report["ratios_vs_torch"].get(name, {}).get(batch)
            table.add_row(
                f"{name} ({result['precision']})",
                batch,
                f"{entry['p50_ms']:.1f}",
                f"{entry['p90_ms']:.1f}",
                f"{entry['images_per_s']:.1f}",
                "1.00x (reference)" if name == "torch" else ("-" if ratio is None else f"{ratio:.2f}x"),
            )
    console.print(table)
    for name, result in report["backends"].items():
        if result["int8_gate"] is not None:
            console.print(f"{name}: {result['int8_gate']['summary']}")
        if result["fallback"] is not None:
            console.print(f"{name} served {result['precision']}: {result['fallback']}")
    device = report["device"]
    console.print(
        f"device: {device['cpu']}, {device['physical_cores']} cores, gpu: {device['gpu'] or 'none'}"
    )
