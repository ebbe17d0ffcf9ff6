"""TensorRT engines built from an export directory, with a manifest that says when to rebuild.

An engine is tied to the TensorRT version, the GPU and the builder flags (reference/serving.md section
3.2), so each one is written with ``engine_manifest.json`` next to it and rebuilt on any mismatch. Layout
inside an export directory::

    EXPORT/engine.plan             serialized engine: FP32, or FP16 (model.onnx + the FP16 builder flag on
                                   TensorRT 10; model_fp16.onnx, strongly typed, on TensorRT 11), or INT8
                                   (model_int8_trt.onnx: explicit quantization from its Q/DQ nodes)
    EXPORT/engine_manifest.json    TensorRT version, GPU, compute capability, ONNX sha256, precision,
                                   optimisation profile, classes, input shape, parity vs ONNX Runtime

The builder's timing cache lives outside model directories (which are replaced on every incremental
step), one file per GPU model and TensorRT version, under ``$INCSEG_TRT_CACHE`` or
``~/.cache/incseg/tensorrt``. ``tensorrt`` is imported lazily: everything but the build and the runner
works without it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from export.int8 import INT8_MIN_AGREEMENT
from export.manifest import (
    ONNX_FILE,
    ONNX_FP16_FILE,
    ONNX_INT8_TRT_FILE,
    ExportManifest,
    file_sha256,
    read_manifest,
    verify_model_file,
    write_json_atomic,
)
from export.parity import (
    ORT_MIN_AGREEMENT,
    TRT_FP16_MIN_AGREEMENT,
    check_agreement,
    parity_inputs,
    require_parity,
    run_onnx,
)

ENGINE_FILE = "engine.plan"
ENGINE_MANIFEST_FILE = "engine_manifest.json"
PRECISIONS = ("fp16", "fp32", "int8")
# argmax agreement an engine must reach against ONNX Runtime CPU FP32, per precision
MIN_AGREEMENT = {"fp16": TRT_FP16_MIN_AGREEMENT, "fp32": ORT_MIN_AGREEMENT, "int8": INT8_MIN_AGREEMENT}
WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to on the machine that runs it."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str


@dataclass(frozen=True)
class EngineBuild:
    """Outcome of :func:`ensure_engine`.

    Attributes:
        engine_path: The serialized engine.
        manifest: Contents of ``engine_manifest.json``.
        rebuilt: Whether this call built the engine.
        reason: Why it was rebuilt (None when the existing engine was kept).
    """

    engine_path: Path
    manifest: dict
    rebuilt: bool
    reason: str | None


def tensorrt_available() -> bool:
    """Whether ``tensorrt`` is importable and a CUDA GPU is visible."""
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def current_device_info(device_index: int = 0) -> DeviceInfo:
    """GPU name, compute capability and TensorRT version of this machine.

    Raises:
        RuntimeError: No CUDA GPU or no TensorRT.
    """
    if not tensorrt_available():
        raise RuntimeError("TensorRT needs the `tensorrt` package and a CUDA GPU; neither is usable here")
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability(device_index)
    return DeviceInfo(torch.cuda.get_device_name(device_index), f"{major}.{minor}", trt.__version__)


def profile_batches(max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimisation profile: 1, max // 2 (at least 1), max."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return 1, max(1, max_batch // 2), max_batch


def engine_is_stale(
    manifest: dict | None,
    device_info: DeviceInfo,
    onnx_sha256: str,
    precision: str,
    max_batch: int | None = None,
) -> str | None:
    """Why an existing engine cannot be used here, or None when it can.

    Args:
        manifest: The engine's manifest (None when there is no engine).
        device_info: This machine (see :func:`current_device_info`).
        onnx_sha256: Hash of the ONNX model the engine must come from.
        precision: Wanted precision, ``fp16``, ``fp32`` or ``int8``.
        max_batch: Wanted largest batch; None accepts any profile.
    """
    if manifest is None:
        return "no engine built yet"
    wanted = {
        "tensorrt_version": device_info.tensorrt_version,
        "gpu_name": device_info.gpu_name,
        "compute_capability": device_info.compute_capability,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
    }
    for key, value in wanted.items():
        if manifest.get(key) != value:
            return f"{key} changed: engine has {manifest.get(key)!r}, need {value!r}"
    if max_batch is not None and manifest.get("profile", {}).get("batch") != list(profile_batches(max_batch)):
        return f"profile changed: engine has {manifest.get('profile')!r}, need max batch {max_batch}"
    return None


def default_cache_dir() -> Path:
    """Where timing caches persist: ``$INCSEG_TRT_CACHE`` or ``~/.cache/incseg/tensorrt``."""
    return Path(os.environ.get("INCSEG_TRT_CACHE", Path.home() / ".cache" / "incseg" / "tensorrt"))


def timing_cache_path(cache_dir: Path, device_info: DeviceInfo) -> Path:
    """One timing cache file per GPU model, compute capability and TensorRT version."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", device_info.gpu_name).strip("-").lower()
    name = f"timing-{gpu}-sm{device_info.compute_capability}-trt{device_info.tensorrt_version}.cache"
    return Path(cache_dir) / name


def fp16_builder_flag_available() -> bool:
    """Whether TensorRT still has ``BuilderFlag.FP16`` (10.x); 11.x builds strongly typed networks only."""
    import tensorrt as trt

    return hasattr(trt.BuilderFlag, "FP16")


def engine_source(export_dir: Path, precision: str) -> Path:
    """The ONNX file an engine of ``precision`` is built from.

    TensorRT 10 builds FP16 engines from ``model.onnx`` with the FP16 builder flag. TensorRT 11 removed
    that flag: there an FP16 engine is built from ``model_fp16.onnx`` (export with ``fp16=True``). INT8
    engines come from the Q/DQ model ``model_int8_trt.onnx`` (explicit quantization; the implicit calibrators
    are deprecated since TensorRT 10.1).

    Raises:
        FileNotFoundError: TensorRT 11 needs ``model_fp16.onnx`` and the export has none, or INT8 was asked
            for and the export has no INT8 model.
    """
    if precision == "int8":
        path = Path(export_dir) / ONNX_INT8_TRT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{export_dir} has no {ONNX_INT8_TRT_FILE}; export it with --int8")
        return path
    if precision != "fp16" or fp16_builder_flag_available():
        return Path(export_dir) / ONNX_FILE
    path = Path(export_dir) / ONNX_FP16_FILE
    if not path.is_file():
        raise FileNotFoundError(f"this TensorRT has no FP16 builder flag; re-export {export_dir} with --fp16")
    return path


def serving_precision(export_dir: Path, fp16: bool, int8: bool = False) -> str:
    """``int8`` when asked for and the export's TensorRT INT8 model passed its gate; else ``fp16`` when asked
    for and buildable from this export on this TensorRT; else ``fp32``.

    On TensorRT 11 an export without ``model_fp16.onnx`` (the service's worker may export FP32 only) is
    served from an FP32 engine rather than not at all.
    """
    entry = read_manifest(export_dir).int8 if int8 else None
    if entry is not None and entry.tensorrt.passed:
        return "int8"
    if not fp16:
        return "fp32"
    buildable = fp16_builder_flag_available() or (Path(export_dir) / ONNX_FP16_FILE).is_file()
    return "fp16" if buildable else "fp32"


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    precision: str,
    max_batch: int,
    timing_cache: Path,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> dict:
    """Builds and writes a serialized engine with one optimisation profile on the batch dimension.

    Args:
        onnx_path: ONNX model with a dynamic batch and a fixed (3, H, W).
        engine_path: Where to write the engine.
        precision: ``fp16`` (the builder FP16 flag where TensorRT has it: FP32 is kept where faster or
            needed; without it the precision comes from the ONNX file, see :func:`engine_source`), ``fp32``,
            or ``int8`` (a Q/DQ model: INT8 where its Q/DQ nodes say, with the INT8 and FP16 flags on
            TensorRT 10's weakly typed networks; TensorRT 11 takes the precision from the graph alone).
        max_batch: Largest batch of the profile.
        timing_cache: Timing cache file, read when present and rewritten after the build.
        workspace_bytes: Builder workspace limit.

    Returns:
        The profile as ``{"input": name, "batch": [min, opt, max], "shape": [3, H, W]}``.

    Raises:
        RuntimeError: Parsing or building failed (with the parser's errors).
    """
    import tensorrt as trt

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision in ("fp16", "int8") and fp16_builder_flag_available():
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)
    tensor = network.get_input(0)
    chw = tuple(tensor.shape)[1:]
    batches = profile_batches(max_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, *[(batch, *chw) for batch in batches])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path.write_bytes(memoryview(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_cache = tempfile.mkstemp(prefix=f".{timing_cache.name}.", dir=timing_cache.parent)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(memoryview(config.get_timing_cache().serialize()))
    os.replace(tmp_cache, timing_cache)
    return {"input": tensor.name, "batch": list(batches), "shape": list(chw)}


class EngineRunner:
    """Runs a serialized engine on device buffers allocated once for the profile's largest batch.

    Args:
        engine_path: Serialized engine.
        device_index: CUDA device.
    """

    def __init__(self, engine_path: Path, device_index: int = 0) -> None:
        import tensorrt as trt

        self.device = torch.device("cuda", device_index)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine it deserializes
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {engine_path} (see its log above)")
            self.context = self.engine.create_execution_context()
            names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
            modes = {name: self.engine.get_tensor_mode(name) for name in names}
            self.input_name = next(name for name in names if modes[name] == trt.TensorIOMode.INPUT)
            self.output_name = next(name for name in names if modes[name] == trt.TensorIOMode.OUTPUT)
            largest = tuple(self.engine.get_tensor_profile_shape(self.input_name, 0)[2])
            self.max_batch = largest[0]
            self.context.set_input_shape(self.input_name, largest)
            dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
            self.input = torch.empty(
                largest, dtype=dtypes[self.engine.get_tensor_dtype(self.input_name)], device=self.device
            )
            self.output = torch.empty(
                tuple(self.context.get_tensor_shape(self.output_name)),
                dtype=dtypes[self.engine.get_tensor_dtype(self.output_name)],
                device=self.device,
            )
            self.context.set_tensor_address(self.input_name, self.input.data_ptr())
            self.context.set_tensor_address(self.output_name, self.output.data_ptr())
            self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (n, C, H, W) on the GPU for a batch (n, 3, H, W) with n <= ``max_batch``."""
        count = batch.shape[0]
        if not 1 <= count <= self.max_batch:
            raise ValueError(f"batch of {count}; this engine takes 1..{self.max_batch}")
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.input[:count].copy_(batch, non_blocking=True)
            self.context.set_input_shape(self.input_name, (count, *self.input.shape[1:]))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see its log above)")
            logits = self.output[:count].clone()
            self.stream.synchronize()
        return logits

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Host convenience: logits float32 (n, C, H, W) for a host batch, any n (run in chunks)."""
        chunks = [
            self.run(torch.from_numpy(batch[start : start + self.max_batch])).float().cpu().numpy()
            for start in range(0, batch.shape[0], self.max_batch)
        ]
        return np.concatenate(chunks)


def read_engine_manifest(export_dir: Path) -> dict | None:
    """The engine's manifest, or None when there is no engine or either file is unreadable (: rebuild)."""
    manifest_path = Path(export_dir) / ENGINE_MANIFEST_FILE
    if not (manifest_path.is_file() and (Path(export_dir) / ENGINE_FILE).is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def ensure_engine(
    export_dir: Path,
    precision: str = "fp16",
    max_batch: int = 4,
    cache_dir: Path | None = None,
    force: bool = False,
) -> EngineBuild:
    """Returns a usable engine for ``export_dir`` on this GPU, rebuilding it when stale.

    Only reads when the engine next to the export is current. Otherwise the new engine must agree with
    ONNX Runtime (CPU, FP32) on the argmax of >= 99.5 % of the pixels (FP16), >= 99 % (INT8, the INT8
    gate of :mod:`export.int8`) or >= 99.9 % (FP32) of
    deterministic synthetic inputs before it replaces the old one; the engine is written to a temporary
    file and renamed into place, then its manifest is written atomically (a crash in between leaves an
    engine without a manifest, which the next open rebuilds). Builds of one model are serialised on this
    host by a lock file in ``cache_dir``: a second process (another API replica) waits, then uses the
    engine the first one built.

    Args:
        export_dir: Export directory (see :mod:`export.onnx_export`).
        precision: ``fp16``, ``fp32`` or ``int8``.
        max_batch: Largest batch of the optimisation profile.
        cache_dir: Directory of timing caches (default :func:`default_cache_dir`).
        force: Rebuild even when the engine looks current.

    Raises:
        RuntimeError: No TensorRT/GPU, or the build failed.
        InvalidExportError: The export's manifest or ONNX file is bad (hash mismatch, missing key).
        ParityError: The new engine disagrees with ONNX Runtime; the old engine is kept.
    """
    export_dir = Path(export_dir)
    export_manifest = read_manifest(export_dir)
    device_info = current_device_info()
    onnx_path = engine_source(export_dir, precision)
    int8_target = "tensorrt" if onnx_path.name == ONNX_INT8_TRT_FILE else None
    onnx_path = verify_model_file(export_dir, export_manifest, onnx_path.name == ONNX_FP16_FILE, int8_target)
    onnx_sha = file_sha256(onnx_path)
    engine_path = export_dir / ENGINE_FILE
    existing = read_engine_manifest(export_dir)
    stale = engine_is_stale(existing, device_info, onnx_sha, precision, max_batch)
    if not force and stale is None and existing is not None:  # no reason: an engine exists and is current
        return EngineBuild(engine_path, existing, False, None)
    cache_dir = Path(cache_dir or default_cache_dir())
    with _build_lock(cache_dir / f"build-{onnx_sha[:16]}-{precision}.lock"):
        # another process (an API replica) may have built it while this one waited for the lock
        existing = read_engine_manifest(export_dir)
        reason = engine_is_stale(existing, device_info, onnx_sha, precision, max_batch)
        if force:
            reason = f"rebuild forced ({reason or 'engine was current'})"
        if reason is None and existing is not None:  # no reason: an engine exists and is current
            return EngineBuild(engine_path, existing, False, None)
        manifest = _build_checked_engine(
            export_dir, export_manifest, onnx_path, onnx_sha, precision, max_batch, cache_dir, device_info
        )
    return EngineBuild(engine_path, manifest, True, reason)


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path``: one engine build per model at a time on this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_checked_engine(
    export_dir: Path,
    export_manifest: ExportManifest,
    onnx_path: Path,
    onnx_sha: str,
    precision: str,
    max_batch: int,
    cache_dir: Path,
    device_info: DeviceInfo,
) -> dict:
    """Builds, parity-checks and installs the engine and its manifest; returns the manifest."""
    engine_path = export_dir / ENGINE_FILE
    manifest_path = export_dir / ENGINE_MANIFEST_FILE
    descriptor, tmp_name = tempfile.mkstemp(prefix=f".{ENGINE_FILE}.", dir=export_dir)
    os.close(descriptor)
    tmp_engine = Path(tmp_name)
    try:
        started = time.perf_counter()
        profile = build_engine(
            onnx_path,
            tmp_engine,
            precision,
            max_batch,
            timing_cache_path(cache_dir, device_info),
        )
        seconds = time.perf_counter() - started
        inputs = parity_inputs(
            export_manifest.input_size,
            sorted({1, max_batch}),
            export_manifest.mean,
            export_manifest.std,
        )
        runner = EngineRunner(tmp_engine)
        report = require_parity(
            check_agreement(
                lambda batch: run_onnx(export_dir / ONNX_FILE, [batch])[0],
                runner.logits,
                inputs,
                MIN_AGREEMENT[precision],
                ("onnxruntime-cpu", f"tensorrt-{precision}"),
            )
        )
        del runner
        manifest = {
            **asdict(device_info),
            "onnx_file": onnx_path.name,
            "onnx_sha256": onnx_sha,
            "precision": precision,
            "profile": profile,
            "classes": export_manifest.classes,
            "input_shape": profile["shape"],
            "model_version": export_manifest.model_version,
            "build_seconds": round(seconds, 1),
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "parity": report.to_dict(),
        }
        manifest_path.unlink(missing_ok=True)  # a crash from here on leaves "no manifest": rebuild
        tmp_engine.chmod(0o644)
        os.replace(tmp_engine, engine_path)
        write_json_atomic(manifest_path, manifest)
    finally:
        tmp_engine.unlink(missing_ok=True)
    return manifest
