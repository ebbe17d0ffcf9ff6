"""Segmentation runtimes behind one interface: PyTorch (reference), ONNX Runtime CPU/CUDA and TensorRT.

All backends share :mod:`export.processing` (letterbox in, unletterbox out), so they differ only in the
forward pass. ``open_runtime`` accepts an export directory (``manifest.json`` + ``model.onnx``, what a
serving process opens) or a model directory (``training.model_dir``). Opening only reads: the manifest is
validated and the ONNX file checked against its recorded hash. A model directory is served from its
cached export ``MODEL_DIR/export-<H>x<W>/`` when that is current, else exported into a temporary
directory that the runtime deletes at close; :func:`ensure_export` (the CLI's) writes the cache. The one
write on open is a TensorRT engine on a GPU, built and cached next to the export when it is missing or
was built for another GPU or TensorRT version (see :mod:`export.tensorrt_engine`).

A runtime is safe to close while other threads use it: ``close`` refuses new calls, waits for the calls
in flight and only then releases the backend. Opening an export directory on ONNX Runtime imports
neither torch nor ``training`` (the serving process can run without them); model directories, the torch
backend and GPU backends import torch when used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from export.manifest import (
    ExportManifest,
    InvalidExportError,
    file_sha256,
    is_export_dir,
    read_manifest,
    verify_model_file,
)
from export.processing import postprocess, preprocess

if TYPE_CHECKING:
    import torch

    from export.tensorrt_engine import EngineRunner
    from training.model_dir import ModelBundle
    from training.models.bisenet import BiSeNet

BACKENDS = ("trt", "ort-cuda", "ort-cpu", "torch")
BACKEND_CHOICES = ("auto", "trt", "ort", "ort-cpu", "ort-cuda", "torch")
INT8_SUFFIX = "-int8"  # bench-runtime's name for a backend serving the INT8 model
BENCH_BACKENDS = (*BACKENDS, f"trt{INT8_SUFFIX}", f"ort-cpu{INT8_SUFFIX}")
DEFAULT_SIZE = (512, 512)
DEFAULT_MAX_BATCH = 4
# what ONNX Runtime raises for a file it cannot parse or a graph it cannot run
ORT_LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)


class RuntimeClosedError(RuntimeError):
    """A call on a runtime whose ``close`` has begun."""


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(
                Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
            )
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def int8_fallback(manifest: ExportManifest, target: str) -> str | None:
    """Why an export cannot serve INT8 on ``target`` (``cpu``, ``tensorrt``, or ``cuda`` for ONNX Runtime
    CUDA, which has no INT8 model), or None when it can."""
    if target == "cuda":
        return "INT8 is served on ONNX Runtime CPU and TensorRT only; ONNX Runtime CUDA serves FP32/FP16"
    if manifest.int8 is None:
        return "the export has no INT8 model (export with --int8 / INCSEG_INT8=true)"
    model = getattr(manifest.int8, target)
    if not model.passed:
        return f"its INT8 model {model.file} failed the gate ({model.parity['summary']})"
    return None


def _cuda_available() -> bool:
    """Whether torch sees a CUDA GPU; torch is only imported when a GPU package is installed at all."""
    gpu_packages = importlib.util.find_spec("tensorrt") is not None or (
        "CUDAExecutionProvider" in ort.get_available_providers()
    )
    if not gpu_packages or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def available_backends() -> list[str]:
    """Backends usable on this machine, in order of preference (torch last: reference only)."""
    names = []
    cuda = _cuda_available()
    if cuda and importlib.util.find_spec("tensorrt") is not None:
        names.append("trt")
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        names.append("ort-cuda")
    names.append("ort-cpu")
    if importlib.util.find_spec("torch") is not None:
        names.append("torch")
    return names


def resolve_backend(backend: str) -> str:
    """Maps ``auto`` / ``ort`` to a concrete backend name and checks that it is usable here.

    Raises:
        ValueError: Unknown name, or a backend this machine cannot run.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")
    available = available_backends()
    if backend == "auto":
        return available[0]
    if backend == "ort":
        return "ort-cuda" if "ort-cuda" in available else "ort-cpu"
    if backend not in available:
        raise ValueError(f"backend {backend!r} is not usable here (needs a CUDA GPU); available: {available}")
    return backend


def export_dir_for(model_dir: Path, size: tuple[int, int]) -> Path:
    """Where a model directory's cached export at ``size`` lives."""
    return Path(model_dir) / f"export-{size[0]}x{size[1]}"


def _checked_size(export_dir: Path, size: tuple[int, int] | None) -> None:
    """Refuses an export directory of another size than ``size`` (None accepts its own)."""
    have = read_manifest(export_dir).input_size
    if size is not None and tuple(size) != have:
        raise ValueError(
            f"{export_dir} was exported at {have[0]}x{have[1]}, not {size[0]}x{size[1]}; "
            "re-export it or pass the model directory"
        )


def _serving_size(size: tuple[int, int] | None) -> tuple[int, int]:
    """``size`` (H, W) as a tuple (a caller may pass a list), or the default serving size."""
    height, width = size or DEFAULT_SIZE
    return height, width


def current_export(
    model_dir: Path, size: tuple[int, int] | None = None, fp16: bool = False, int8: bool = False
) -> Path | None:
    """The cached export of a model directory when it matches the weights (and has FP16 / INT8 if asked),
    else None.

    Only reads. An unreadable cached export counts as missing.
    """
    from training.model_dir import WEIGHTS_FILE

    out = export_dir_for(model_dir, _serving_size(size))
    if not is_export_dir(out):
        return None
    try:
        manifest = read_manifest(out)
    except InvalidExportError:
        return None
    current = manifest.source.weights_sha256 == file_sha256(Path(model_dir) / WEIGHTS_FILE)
    complete = (manifest.fp16 is not None or not fp16) and (manifest.int8 is not None or not int8)
    return out if current and complete else None


def ensure_export(
    model: Path, size: tuple[int, int] | None = None, fp16: bool = False, calibration: Path | None = None
) -> Path:
    """Returns an export directory for ``model``, exporting a model directory into its cache when needed.

    This is the writing counterpart of :func:`open_runtime` (for the CLI and benchmarks): it writes
    ``MODEL_DIR/export-<H>x<W>/`` unless a current export is already there.

    Args:
        model: Model directory or export directory.
        size: Serving size (H, W). A model directory defaults to 512 x 512; an export directory is fixed at
            its own size and refuses another one.
        fp16: Also require ``model_fp16.onnx`` (only for a model directory; an export keeps what it has).
        calibration: Also require the INT8 models, calibrated on this folder when they must be made (see
            :func:`export.int8.load_calibration`; only for a model directory).

    Raises:
        FileNotFoundError: ``model`` is neither kind of directory.
        ValueError: An export directory of another size was asked for.
    """
    from training.model_dir import is_model_dir

    model = Path(model)
    if is_export_dir(model):
        _checked_size(model, size)
        return model
    if not is_model_dir(model):
        raise FileNotFoundError(f"{model} is neither a model directory nor an export directory")
    size = _serving_size(size)
    cached = current_export(model, size, fp16, int8=calibration is not None)
    if cached is not None:
        return cached
    from export.int8 import load_calibration
    from export.onnx_export import export_onnx
    from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from training.model_dir import read_model_file

    classes = read_model_file(model).classes
    int8 = load_calibration(calibration, classes, size, IMAGENET_MEAN, IMAGENET_STD) if calibration else None
    return export_onnx(model, export_dir_for(model, size), size, fp16=fp16, int8=int8).out_dir


class SegmentationRuntime(ABC):
    """A loaded model that segments RGB images; its methods may be called from several threads.

    Subclasses implement ``_logits`` (and optionally ``_labels``) and ``_release``; the public methods count
    the calls in flight so that :meth:`close` can wait for them.

    Attributes:
        backend: Backend name (``torch``, ``ort-cpu``, ``ort-cuda``, ``trt``).
        classes: Class names, index 0 = background.
        size: Network input (H, W).
        mean: Normalisation mean (RGB, 0..1 pixels).
        std: Normalisation std.
        version: Model version, e.g. ``v3``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        fallback: Why INT8 was asked for and is not served (no INT8 model, or it failed its gate), else None.
        max_batch: Largest batch one forward pass takes (None: any).
        scratch_dir: A temporary directory the runtime owns (an on-the-fly export), deleted after release.
    """

    def __init__(
        self,
        backend: str,
        classes: Sequence[str],
        size: tuple[int, int],
        version: str,
        mean: Sequence[float],
        std: Sequence[float],
        precision: str = "fp32",
        max_batch: int | None = None,
    ) -> None:
        if len(classes) > 255:
            raise ValueError(f"{len(classes)} classes do not fit uint8 label maps")
        self.backend = backend
        self.classes = list(classes)
        self.size = (int(size[0]), int(size[1]))
        self.version = version
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.precision = precision
        self.max_batch = max_batch
        self.fallback: str | None = None
        self.scratch_dir: Path | None = None
        self._idle = threading.Condition()
        self._calls = 0
        self._closing = False
        self._released = False
        self._release_when_idle = False

    @abstractmethod
    def _logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits float32 (N, C, H, W) for a normalised batch float32 (N, 3, H, W)."""

    def _labels(self, batch: np.ndarray) -> np.ndarray:
        """Argmax label maps uint8 (N, H, W) for a normalised batch (N, 3, H, W)."""
        return self._logits(batch).argmax(1).astype(np.uint8)

    @abstractmethod
    def _release(self) -> None:
        """Frees the backend's resources (called once, with no call in flight)."""

    @contextmanager
    def _call(self) -> Iterator[None]:
        """Counts one call in flight; refuses it once ``close`` has begun."""
        with self._idle:
            if self._closing:
                raise RuntimeClosedError(f"{self!r} is closed")
            self._calls += 1
        try:
            yield
        finally:
            with self._idle:
                self._calls -= 1
                release = self._calls == 0 and self._release_when_idle and not self._released
                self._released = self._released or release
                self._idle.notify_all()
            if release:
                self._finish()

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits float32 (N, C, H, W) for a normalised batch float32 (N, 3, H, W)."""
        with self._call():
            return self._logits(batch)

    def predict_labels(self, batch: np.ndarray) -> np.ndarray:
        """Argmax label maps uint8 (N, H, W) on the canvas for a normalised batch (N, 3, H, W)."""
        with self._call():
            return self._labels(batch)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Segments RGB uint8 images (h, w, 3) of any sizes; returns uint8 label maps (h, w) per image."""
        if not images:
            return []
        with self._call():
            batch, boxes = preprocess(images, self.size, self.mean, self.std)  # (N, 3, H, W)
            step = self.max_batch or len(images)
            chunks = [self._labels(batch[start : start + step]) for start in range(0, len(batch), step)]
        return postprocess(np.concatenate(chunks), boxes)

    def warmup(self, iterations: int = 2) -> None:
        """Runs a few forward passes so that first-call costs (allocation, autotuning) are paid now."""
        batch = np.zeros((1, 3, *self.size), dtype=np.float32)
        with self._call():
            for _ in range(iterations):
                self._labels(batch)

    @property
    def closed(self) -> bool:
        """Whether ``close`` has begun (new calls are refused)."""
        return self._closing

    def close(self, timeout: float | None = None) -> bool:
        """Refuses new calls, waits for the calls in flight, then releases the backend (idempotent).

        Args:
            timeout: Seconds to wait for the calls in flight (None: as long as they take). When it expires,
                the last of them releases the backend as it returns.

        Returns:
            Whether the backend has been released when this returns.
        """
        with self._idle:
            self._closing = True
            self._idle.wait_for(lambda: self._calls == 0, timeout)
            if self._released or self._calls:
                self._release_when_idle = not self._released
                return self._released
            self._released = True
        self._finish()
        return True

    def _finish(self) -> None:
        try:
            self._release()
        finally:
            if self.scratch_dir is not None:
                shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def __enter__(self) -> SegmentationRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, version={self.version!r}, "
            f"classes={len(self.classes)}, size={self.size}, precision={self.precision!r})"
        )


class TorchRuntime(SegmentationRuntime):
    """The PyTorch model itself (eager, ``inference_mode``): the reference backend.

    Needs a model directory: an export directory holds no PyTorch weights.
    """

    def __init__(self, bundle: ModelBundle, size: tuple[int, int], device: torch.device) -> None:
        from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        super().__init__("torch", bundle.classes, size, f"v{bundle.version}", IMAGENET_MEAN, IMAGENET_STD)
        self.device = device
        self.model: BiSeNet | None = bundle.model.to(device).eval()  # None once released

    @classmethod
    def load(
        cls, model_dir: Path, size: tuple[int, int] | None = None, device: str | None = None
    ) -> TorchRuntime:
        """Loads a model directory (without auxiliary heads) on ``device`` (default: CUDA when available).

        Raises:
            ValueError: ``model_dir`` is an export directory.
        """
        import torch

        from training.model_dir import ModelBundle, is_model_dir

        model_dir = Path(model_dir)
        if is_export_dir(model_dir) and not is_model_dir(model_dir):
            source = read_manifest(model_dir).source.model_dir
            raise ValueError(
                f"{model_dir} is an export directory: it has no PyTorch weights, so the torch backend cannot "
                f"run it; pass the model directory instead{f' ({source})' if source else ''} "
                "or choose an ONNX backend"
            )
        torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bundle = ModelBundle.load(model_dir, aux=False, map_location=torch_device)
        return cls(bundle, size or DEFAULT_SIZE, torch_device)

    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        import torch

        if self.model is None:
            raise RuntimeClosedError(f"{self!r} is closed")
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device))

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch).float().cpu().numpy()

    def _labels(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self._forward(batch).argmax(1).to(torch.uint8).cpu().numpy()

    def _release(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


class OrtRuntime(SegmentationRuntime):
    """ONNX Runtime on the CPU or CUDA execution provider, opened from an export directory (read only).

    Session options: graph optimisation ``ORT_ENABLE_ALL`` (constant folding, Conv+BN/activation fusion
    and, on CPU, the NCHWc layout transform), ``intra_op_num_threads`` = ``threads`` (default: physical
    cores) and one inter-op thread (the graph runs sequentially), so two sessions alive during a model
    swap can be given half the cores each instead of both taking all of them.

    INT8 (``model_int8.onnx``, CPU only) is served when asked for and its gate passed; otherwise FP32, with
    the reason in ``fallback``.

    Raises:
        FileNotFoundError: ``export_dir`` is not an export directory.
        InvalidExportError: Bad manifest, model file not the recorded one, or ONNX Runtime cannot load it.
    """

    def __init__(
        self,
        export_dir: Path,
        device: str = "cpu",
        fp16: bool = False,
        threads: int | None = None,
        int8: bool = False,
    ) -> None:
        manifest = read_manifest(export_dir)
        use_fp16 = fp16 and device == "cuda" and manifest.fp16 is not None
        fallback = int8_fallback(manifest, device) if int8 else None
        use_int8 = int8 and fallback is None
        super().__init__(
            f"ort-{device}",
            manifest.classes,
            manifest.input_size,
            manifest.version_name,
            manifest.mean,
            manifest.std,
            "int8" if use_int8 else "fp16" if use_fp16 else "fp32",
        )
        self.fallback = fallback
        self.export_dir = Path(export_dir)
        int8_target = "cpu" if use_int8 else None
        model_path = verify_model_file(self.export_dir, manifest, use_fp16 and not use_int8, int8_target)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        self.threads = options.intra_op_num_threads
        providers = [("CUDAExecutionProvider", {"device_id": 0})] if device == "cuda" else []
        try:
            self.session = ort.InferenceSession(
                str(model_path), options, providers=[*providers, "CPUExecutionProvider"]
            )
        except ORT_LOAD_ERRORS as error:
            raise InvalidExportError(f"{model_path}: ONNX Runtime cannot load it ({error})") from None
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            providers = self.session.get_providers()
            raise RuntimeError(f"ONNX Runtime did not enable CUDA (providers: {providers})")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, np.float32)}
        return self.session.run([self.output_name], feed)[0]

    def _labels(self, batch: np.ndarray) -> np.ndarray:
        if self.backend == "ort-cpu":
            return super()._labels(batch)
        import torch

        # CUDA: bind the logits to a torch CUDA tensor so that the argmax runs on the GPU and only the
        # uint8 labels cross back to the host
        shape = (batch.shape[0], len(self.classes), *self.size)
        logits = torch.empty(shape, dtype=torch.float32, device="cuda")
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch, np.float32))
        binding.bind_output(self.output_name, "cuda", 0, np.float32, tuple(logits.shape), logits.data_ptr())
        self.session.run_with_iobinding(binding)
        return logits.argmax(1).to(torch.uint8).cpu().numpy()

    def _release(self) -> None:
        self.session = None


class TensorRTRuntime(SegmentationRuntime):
    """A TensorRT engine for this GPU from an export directory (see ``export.tensorrt_engine``).

    The engine next to the export is used when its manifest matches this GPU, TensorRT version, ONNX hash,
    precision and profile; otherwise it is built (parity-checked against ONNX Runtime) and cached there.
    """

    def __init__(
        self, export_dir: Path, fp16: bool = True, max_batch: int = DEFAULT_MAX_BATCH, int8: bool = False
    ) -> None:
        from export.tensorrt_engine import EngineRunner, ensure_engine, serving_precision

        manifest = read_manifest(export_dir)
        precision = serving_precision(export_dir, fp16, int8)
        self.build = ensure_engine(export_dir, precision, max_batch)
        self.runner: EngineRunner | None = EngineRunner(self.build.engine_path)  # None once released
        super().__init__(
            "trt",
            manifest.classes,
            manifest.input_size,
            manifest.version_name,
            manifest.mean,
            manifest.std,
            precision,
            self.runner.max_batch,
        )
        self.fallback = int8_fallback(manifest, "tensorrt") if int8 else None

    def _live_runner(self) -> EngineRunner:
        if self.runner is None:
            raise RuntimeClosedError(f"{self!r} is closed")
        return self.runner

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        return self._live_runner().logits(np.ascontiguousarray(batch, np.float32))

    def _labels(self, batch: np.ndarray) -> np.ndarray:
        import torch

        logits = self._live_runner().run(torch.from_numpy(np.ascontiguousarray(batch, np.float32)))
        return logits.argmax(1).to(torch.uint8).cpu().numpy()

    def _release(self) -> None:
        import torch

        self.runner = None
        torch.cuda.empty_cache()


def _open_export(
    export_dir: Path, backend: str, fp16: bool, max_batch: int, threads: int | None, int8: bool
) -> SegmentationRuntime:
    """Opens an export directory on a concrete ONNX-based backend (``trt``, ``ort-cuda``, ``ort-cpu``)."""
    if backend == "trt":
        return TensorRTRuntime(export_dir, fp16, max_batch, int8)
    return OrtRuntime(export_dir, "cuda" if backend == "ort-cuda" else "cpu", fp16, threads, int8)


def open_runtime(
    model: Path,
    backend: str = "auto",
    size: tuple[int, int] | None = None,
    fp16: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
    threads: int | None = None,
    int8: bool = False,
) -> SegmentationRuntime:
    """Opens ``model`` (export directory or model directory) on a backend, without writing into it.

    Args:
        model: Export directory or model directory.
        backend: ``auto`` (TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU), ``ort`` (CUDA when
            available, else CPU), or a name from :data:`BACKENDS`.
        size: Serving size (H, W); default 512 x 512 for a model directory, the export's own size otherwise.
        fp16: Use FP16 on GPU backends (TensorRT engine precision; ``model_fp16.onnx`` on ONNX Runtime
            CUDA when the export has it). CPU backends always run FP32.
        max_batch: Largest batch of a TensorRT engine's profile.
        threads: Intra-op threads of an ONNX Runtime session (default: physical cores).
        int8: Serve the export's INT8 model (ONNX Runtime CPU, TensorRT) when it passed its gate; else the
            runtime serves FP32/FP16 and says why in ``fallback``. A model directory is exported without INT8
            here (calibration needs images: :func:`export.onnx_export.export_onnx` with ``int8=``).

    Raises:
        ValueError: Unknown or unusable backend, an export of another size, or an export directory for the
            torch backend.
        FileNotFoundError: ``model`` is neither kind of directory.
        InvalidExportError: The export's manifest or model file is bad (the message names the file).
    """
    model = Path(model)
    if is_export_dir(model):
        name = resolve_backend(backend)
        if name == "torch":
            return TorchRuntime.load(model, size)
        _checked_size(model, size)
        return _open_export(model, name, fp16, max_batch, threads, int8)
    from training.model_dir import is_model_dir

    if not is_model_dir(model):
        raise FileNotFoundError(f"{model} is neither a model directory nor an export directory")
    name = resolve_backend(backend)
    if name == "torch":
        return TorchRuntime.load(model, size)
    size = _serving_size(size)
    with_fp16 = fp16 and name != "ort-cpu"
    cached = current_export(model, size, with_fp16)
    if cached is not None:
        return _open_export(cached, name, fp16, max_batch, threads, int8)
    from export.onnx_export import export_onnx

    scratch = Path(tempfile.mkdtemp(prefix="incseg-export-"))
    try:
        export_dir = export_onnx(model, scratch / "export", size, fp16=with_fp16).out_dir
        runtime = _open_export(export_dir, name, fp16, max_batch, threads, int8)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    runtime.scratch_dir = scratch
    return runtime
