"""Segmentation runtimes behind one interface: PyTorch (reference), ONNX Runtime CPU/CUDA and TensorRT.

All backends share :mod:`export.processing` (letterbox in, unletterbox out), so they differ only in the
forward pass. ``open_runtime`` accepts either a model directory (``training.model_dir``) or an export
directory (``manifest.json`` + ``model.onnx``); ONNX-based backends given a model directory export it on
the fly into ``MODEL_DIR/export-<H>x<W>/`` (reused while the weights' hash matches).
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import (
    ONNX_FILE,
    ONNX_FP16_FILE,
    export_onnx,
    file_sha256,
    is_export_dir,
    read_manifest,
)
from export.processing import postprocess, preprocess
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from training.model_dir import WEIGHTS_FILE, ModelBundle, is_model_dir

BACKENDS = ("trt", "ort-cuda", "ort-cpu", "torch")
BACKEND_CHOICES = ("auto", "trt", "ort", "ort-cpu", "ort-cuda", "torch")
DEFAULT_SIZE = (512, 512)
DEFAULT_MAX_BATCH = 4


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


def _cuda_ort_available() -> bool:
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def available_backends() -> list[str]:
    """Backends usable on this machine, in order of preference (torch last: reference only)."""
    names = []
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None:
        names.append("trt")
    if _cuda_ort_available():
        names.append("ort-cuda")
    return [*names, "ort-cpu", "torch"]


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
    """Where a model directory's on-the-fly export at ``size`` lives."""
    return Path(model_dir) / f"export-{size[0]}x{size[1]}"


def ensure_export(model: Path, size: tuple[int, int] | None = None, fp16: bool = False) -> Path:
    """Returns an export directory for ``model``, exporting a model directory when needed.

    Args:
        model: Model directory or export directory.
        size: Serving size (H, W). A model directory defaults to 512 x 512; an export directory is fixed at
            its own size and refuses another one.
        fp16: Also require ``model_fp16.onnx`` (only for a model directory; an export keeps what it has).

    Raises:
        FileNotFoundError: ``model`` is neither kind of directory.
        ValueError: An export directory of another size was asked for.
    """
    model = Path(model)
    if is_export_dir(model):
        have = tuple(read_manifest(model)["input_size"])
        if size is not None and tuple(size) != have:
            raise ValueError(
                f"{model} was exported at {have[0]}x{have[1]}, not {size[0]}x{size[1]}; "
                "re-export it or pass the model directory"
            )
        return model
    if not is_model_dir(model):
        raise FileNotFoundError(f"{model} is neither a model directory nor an export directory")
    size = tuple(size or DEFAULT_SIZE)
    out = export_dir_for(model, size)
    if is_export_dir(out):
        manifest = read_manifest(out)
        current = manifest["source"]["weights_sha256"] == file_sha256(model / WEIGHTS_FILE)
        if current and (manifest["fp16"] or not fp16):
            return out
    return export_onnx(model, out, size, fp16=fp16).out_dir


class SegmentationRuntime(ABC):
    """A loaded model that segments RGB images.

    Attributes:
        backend: Backend name (``torch``, ``ort-cpu``, ``ort-cuda``, ``trt``).
        classes: Class names, index 0 = background.
        size: Network input (H, W).
        mean: Normalisation mean (RGB, 0..1 pixels).
        std: Normalisation std.
        version: Model version, e.g. ``v3``.
        precision: ``fp32`` or ``fp16``.
        max_batch: Largest batch one forward pass takes (None: any).
    """

    def __init__(
        self,
        backend: str,
        classes: Sequence[str],
        size: tuple[int, int],
        version: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
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

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, size: tuple[int, int] | None = None) -> SegmentationRuntime:
        """Opens a model directory or an export directory."""

    @abstractmethod
    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits float32 (N, C, H, W) for a normalised batch float32 (N, 3, H, W)."""

    def predict_labels(self, batch: np.ndarray) -> np.ndarray:
        """Argmax label maps uint8 (N, H, W) on the canvas for a normalised batch (N, 3, H, W)."""
        return self.predict_logits(batch).argmax(1).astype(np.uint8)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Segments RGB uint8 images (h, w, 3) of any sizes; returns uint8 label maps (h, w) per image."""
        if not images:
            return []
        batch, boxes = preprocess(images, self.size, self.mean, self.std)
        step = self.max_batch or len(images)
        chunks = [self.predict_labels(batch[start : start + step]) for start in range(0, len(batch), step)]
        labels = np.concatenate(chunks)
        return postprocess(labels, boxes)

    def warmup(self, iterations: int = 2) -> None:
        """Runs a few forward passes so that first-call costs (allocation, autotuning) are paid now."""
        batch = np.zeros((1, 3, *self.size), dtype=np.float32)
        for _ in range(iterations):
            self.predict_labels(batch)

    @abstractmethod
    def close(self) -> None:
        """Releases the backend's resources."""

    def __enter__(self) -> SegmentationRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, version={self.version!r}, "
            f"classes={len(self.classes)}, size={self.size}, precision={self.precision!r})"
        )


def _export_version(manifest: dict) -> str:
    """``v<model_version>`` from an export manifest, else the ONNX hash prefix."""
    version = manifest.get("model_version")
    return f"v{version}" if version is not None else manifest["onnx_sha256"][:12]


class TorchRuntime(SegmentationRuntime):
    """The PyTorch model itself (eager, ``inference_mode``): the reference backend.

    Needs a model directory: an export directory holds no PyTorch weights.
    """

    def __init__(self, bundle: ModelBundle, size: tuple[int, int], device: torch.device) -> None:
        super().__init__("torch", bundle.classes, size, f"v{bundle.version}")
        self.device = device
        self.model = bundle.model.to(device).eval()

    @classmethod
    def load(
        cls, model_dir: Path, size: tuple[int, int] | None = None, device: str | None = None
    ) -> TorchRuntime:
        """Loads a model directory (without auxiliary heads) on ``device`` (default: CUDA when available).

        Raises:
            ValueError: ``model_dir`` is an export directory.
        """
        model_dir = Path(model_dir)
        if is_export_dir(model_dir) and not is_model_dir(model_dir):
            source = read_manifest(model_dir).get("source", {}).get("model_dir")
            raise ValueError(
                f"{model_dir} is an export directory: it has no PyTorch weights, so the torch backend cannot "
                f"run it; pass the model directory instead{f' ({source})' if source else ''} "
                "or choose an ONNX backend"
            )
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(ModelBundle.load(model_dir, aux=False, map_location=device), size or DEFAULT_SIZE, device)

    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device))

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch).float().cpu().numpy()

    def predict_labels(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch).argmax(1).to(torch.uint8).cpu().numpy()

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class OrtRuntime(SegmentationRuntime):
    """ONNX Runtime on the CPU or CUDA execution provider.

    Session options: graph optimisation ``ORT_ENABLE_ALL`` (constant folding, Conv+BN/activation fusion
    and, on CPU, the NCHWc layout transform) and ``intra_op_num_threads`` = physical cores.
    """

    def __init__(
        self, export_dir: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None
    ) -> None:
        manifest = read_manifest(export_dir)
        use_fp16 = fp16 and device == "cuda" and bool(manifest.get("fp16"))
        super().__init__(
            f"ort-{device}",
            manifest["classes"],
            tuple(manifest["input_size"]),
            _export_version(manifest),
            manifest["mean"],
            manifest["std"],
            "fp16" if use_fp16 else "fp32",
        )
        self.export_dir = Path(export_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or physical_cores()
        providers = [("CUDAExecutionProvider", {"device_id": 0})] if device == "cuda" else []
        self.session = ort.InferenceSession(
            str(self.export_dir / (ONNX_FP16_FILE if use_fp16 else ONNX_FILE)),
            options,
            providers=[*providers, "CPUExecutionProvider"],
        )
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            providers = self.session.get_providers()
            raise RuntimeError(f"ONNX Runtime did not enable CUDA (providers: {providers})")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @classmethod
    def load(
        cls,
        model_dir: Path,
        size: tuple[int, int] | None = None,
        device: str = "cpu",
        fp16: bool = False,
        threads: int | None = None,
    ) -> OrtRuntime:
        """Opens an export directory, or exports a model directory first (see :func:`ensure_export`).

        Args:
            model_dir: Model directory or export directory.
            size: Serving size (H, W).
            device: ``cpu`` or ``cuda``.
            fp16: On CUDA, run ``model_fp16.onnx`` (exported when missing from a model directory).
            threads: Intra-op threads (default: physical cores).
        """
        return cls(ensure_export(model_dir, size, fp16 and device == "cuda"), device, fp16, threads)

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, np.float32)}
        return self.session.run([self.output_name], feed)[0]

    def predict_labels(self, batch: np.ndarray) -> np.ndarray:
        if self.backend == "ort-cpu":
            return super().predict_labels(batch)
        # CUDA: bind the logits to a torch CUDA tensor so that the argmax runs on the GPU and only the
        # uint8 labels cross back to the host
        shape = (batch.shape[0], len(self.classes), *self.size)
        logits = torch.empty(shape, dtype=torch.float32, device="cuda")
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch, np.float32))
        binding.bind_output(self.output_name, "cuda", 0, np.float32, tuple(logits.shape), logits.data_ptr())
        self.session.run_with_iobinding(binding)
        return logits.argmax(1).to(torch.uint8).cpu().numpy()

    def close(self) -> None:
        self.session = None


class TensorRTRuntime(SegmentationRuntime):
    """A TensorRT engine built (or reused) for this GPU from the export (see ``export.tensorrt_engine``)."""

    def __init__(self, export_dir: Path, fp16: bool = True, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        from export.tensorrt_engine import EngineRunner, ensure_engine

        manifest = read_manifest(export_dir)
        precision = "fp16" if fp16 else "fp32"
        self.build = ensure_engine(export_dir, precision, max_batch)
        self.runner = EngineRunner(self.build.engine_path)
        super().__init__(
            "trt",
            manifest["classes"],
            tuple(manifest["input_size"]),
            _export_version(manifest),
            manifest["mean"],
            manifest["std"],
            precision,
            self.runner.max_batch,
        )

    @classmethod
    def load(
        cls,
        model_dir: Path,
        size: tuple[int, int] | None = None,
        fp16: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> TensorRTRuntime:
        """Opens an export directory (exporting a model directory first) and ensures a current engine."""
        return cls(ensure_export(model_dir, size, fp16), fp16, max_batch)

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.logits(np.ascontiguousarray(batch, np.float32))

    def predict_labels(self, batch: np.ndarray) -> np.ndarray:
        logits = self.runner.run(torch.from_numpy(np.ascontiguousarray(batch, np.float32)))
        return logits.argmax(1).to(torch.uint8).cpu().numpy()

    def close(self) -> None:
        self.runner = None
        torch.cuda.empty_cache()


def open_runtime(
    model: Path,
    backend: str = "auto",
    size: tuple[int, int] | None = None,
    fp16: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> SegmentationRuntime:
    """Opens ``model`` (model directory or export directory) on a backend.

    Args:
        model: Model directory or export directory.
        backend: ``auto`` (TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU), ``ort`` (CUDA when
            available, else CPU), or a name from :data:`BACKENDS`.
        size: Serving size (H, W); default 512 x 512 for a model directory, the export's own size otherwise.
        fp16: Use FP16 on GPU backends (TensorRT engine precision; ``model_fp16.onnx`` on ONNX Runtime
            CUDA when the export has it). CPU backends always run FP32.
        max_batch: Largest batch of a TensorRT engine's profile.

    Raises:
        ValueError: Unknown or unusable backend, or an export directory for the torch backend.
        FileNotFoundError: ``model`` is neither kind of directory.
    """
    model = Path(model)
    if not (is_model_dir(model) or is_export_dir(model)):
        raise FileNotFoundError(f"{model} is neither a model directory nor an export directory")
    name = resolve_backend(backend)
    if name == "torch":
        return TorchRuntime.load(model, size)
    if name == "trt":
        return TensorRTRuntime.load(model, size, fp16, max_batch)
    return OrtRuntime.load(model, size, "cuda" if name == "ort-cuda" else "cpu", fp16)
