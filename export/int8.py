"""INT8 from a calibration table: activation ranges kept beside a version instead of its images.

A task's images are deleted after its step, so the worker calibrates during the step while they exist and
keeps only the ranges (``calibration.json``, ONNX Runtime's calibration-cache format: per-tensor lowest /
highest activation, no pixels). The INT8 models are then quantised from the table alone, QDQ ONNX with
per-channel symmetric INT8 weights: one with asymmetric UINT8 activations for ONNX Runtime CPU, one with
symmetric INT8 activations for TensorRT 10's explicit quantization (zero points must be 0 there). Tables
of earlier versions can be merged in (union of the ranges) so that classes absent from a step's images
keep their coverage. The INT8 gate compares each INT8 model with the FP32 one on labelled images (see
BENCHMARKS.md, "INT8").
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quantize_static,
)
from onnxruntime.quantization.calibrate import TensorData, TensorsData, load_tensors_data, save_tensors_data

from export.manifest import ONNX_INT8_FILE, ONNX_INT8_TRT_FILE
from export.processing import letterbox_labels, preprocess

INT8_MIN_AGREEMENT = 0.99
INT8_MAX_MIOU_LOSS = 1.0  # mIoU points (percent) the INT8 model may lose against FP32
CALIBRATION_METHOD = CalibrationMethod.MinMax
CALIBRATION_BATCH = 4
CALIBRATION_IMAGES = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IGNORE_LABEL = 255


@dataclass(frozen=True)
class QuantScheme:
    """How one runtime's INT8 model quantises activations (weights: symmetric INT8 per output channel).

    Attributes:
        target: The manifest key (``cpu``, ``tensorrt``).
        file: The QDQ model's file name.
        activation_type: INT8 or UINT8 activations.
        symmetric_activations: Zero point 0 (the table's range made symmetric around 0).
        reduce_range: 7-bit weights, so that x86 without VNNI cannot saturate its 16-bit pair sums.
    """

    target: str
    file: str
    activation_type: QuantType
    symmetric_activations: bool
    reduce_range: bool

    @property
    def description(self) -> str:
        """One line for the manifest, e.g. ``QDQ, asymmetric UINT8 activations, ... weights``."""
        kind = "symmetric INT8" if self.symmetric_activations else "asymmetric UINT8"
        bits = "7-bit" if self.reduce_range else "INT8"
        return f"QDQ, {kind} activations, symmetric per-channel {bits} weights"


# ONNX Runtime on x86 runs UINT8 activations x INT8 weights; asymmetric ranges keep every level for ReLU
# outputs, which symmetric ones halve, and 7-bit weights avoid AVX2's saturation (BENCHMARKS.md, "INT8")
CPU_SCHEME = QuantScheme("cpu", ONNX_INT8_FILE, QuantType.QUInt8, False, True)
# TensorRT's explicit quantization takes INT8 Q/DQ with zero point 0 only
TENSORRT_SCHEME = QuantScheme("tensorrt", ONNX_INT8_TRT_FILE, QuantType.QInt8, True, False)
SCHEMES = (CPU_SCHEME, TENSORRT_SCHEME)


@dataclass(frozen=True)
class LabelledBatches:
    """Letterboxed images at the serving size, and their masks when known.

    Attributes:
        batches: Normalised float32 (n, 3, H, W) batches.
        labels: uint8 (n, H, W) class indices per batch (255: ignore, and the letterbox border), or None.
    """

    batches: list[np.ndarray]
    labels: list[np.ndarray] | None

    @classmethod
    def from_images(
        cls,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray] | None,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        batch: int = CALIBRATION_BATCH,
    ) -> LabelledBatches:
        """Letterboxes RGB uint8 images (h, w, 3), and masks (h, w) of the same sizes, as serving does."""
        if not images:
            raise ValueError("calibration needs at least one image")
        if masks is not None and len(masks) != len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images")
        batches, labels = [], []
        for start in range(0, len(images), batch):
            array, boxes = preprocess(images[start : start + batch], size, mean, std)  # (n, 3, H, W)
            batches.append(array)
            if masks is not None:
                chunk = masks[start : start + batch]
                pairs = zip(chunk, boxes, strict=True)
                placed = [letterbox_labels(mask, box, IGNORE_LABEL) for mask, box in pairs]
                labels.append(np.stack(placed))  # (n, H, W)
        return cls(batches, labels if masks is not None else None)

    @property
    def count(self) -> int:
        """Number of images."""
        return sum(len(batch) for batch in self.batches)


@dataclass(frozen=True)
class Int8Calibration:
    """What an INT8 export calibrates and gates on.

    Attributes:
        calibration: Images the activation ranges are measured on (labels unused).
        evaluation: Images the INT8 gate compares FP32 and INT8 on; mIoU is gated when they have labels.
        earlier_tables: Calibration tables of earlier versions whose ranges are merged in.
        method: How ranges are taken from the calibration activations.
    """

    calibration: LabelledBatches
    evaluation: LabelledBatches
    earlier_tables: tuple[Path, ...] = ()
    method: CalibrationMethod = CALIBRATION_METHOD


def _spread(items: Sequence, limit: int) -> list:
    """At most ``limit`` items, evenly spaced over the sequence (every class's images, not the first few)."""
    if len(items) <= limit:
        return list(items)
    return [items[int(index)] for index in np.linspace(0, len(items) - 1, limit)]


def load_calibration(
    folder: Path,
    classes: Sequence[str],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    limit: int = CALIBRATION_IMAGES,
    earlier_tables: Sequence[Path] = (),
) -> Int8Calibration:
    """Calibration and gate images from a folder of images or a dataset folder (classes.txt, images, masks).

    A dataset calibrates on its training images and gates on its validation images and masks, or on the
    calibration images and their masks when it has no validation split (a split with image-level labels
    only, ``labels.csv``, gives images without masks); its labels are matched to the
    model's ``classes`` by name, as a step does (dataset class 0 is background, unknown classes ignored). A
    plain folder of images calibrates and gates on its images, without labels (the gate is then argmax
    agreement alone).

    Raises:
        FileNotFoundError: No such folder, or no image in it.
        DataError: A dataset that cannot be read.
    """
    from training.data import load_image
    from training.data.sources import Sample, load_mask, read_source

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist")
    if (folder / "classes.txt").is_file():
        source = read_source(folder)
        calibration_samples = _spread(source.train, limit)
        evaluation_samples = _spread(source.val, limit) or calibration_samples
        count = len(source.classes)
        model_index = {name: index for index, name in enumerate(classes)}
        to_model = np.full(256, IGNORE_LABEL, np.uint8)  # dataset label -> model label
        to_model[:count] = [0, *(model_index.get(name, IGNORE_LABEL) for name in source.classes[1:])]

        def read(samples: Sequence[Sample]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
            """Images and masks; no masks when a sample has image-level labels only (labels.csv)."""
            images = [np.asarray(load_image(sample.image_path)) for sample in samples]
            if any(sample.is_weak for sample in samples):
                return images, None
            return images, [to_model[load_mask(sample, count, source.label_map)] for sample in samples]

        images, masks = read(calibration_samples)
        evaluation = LabelledBatches.from_images(*read(evaluation_samples), size, mean, std)
        calibration = LabelledBatches.from_images(images, masks, size, mean, std)
    else:
        paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        images = [np.asarray(load_image(path)) for path in _spread(paths, limit)]
        calibration = evaluation = LabelledBatches.from_images(images, None, size, mean, std)
    return Int8Calibration(calibration, evaluation, tuple(earlier_tables))


class _BatchReader(CalibrationDataReader):
    """Feeds batches to an ONNX Runtime calibrator."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._feeds = iter([{input_name: np.ascontiguousarray(batch, np.float32)} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def compute_table(
    onnx_path: Path, batches: Sequence[np.ndarray], method: CalibrationMethod = CALIBRATION_METHOD
) -> TensorsData:
    """Activation ranges of every tensor the quantiser needs, observed on ``batches`` (N, 3, H, W)."""
    input_name = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="incseg-calibrate-") as tmp:
        calibrator = create_calibrator(
            Path(onnx_path),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method,
            extra_options={"symmetric": False},  # raw ranges: the quantiser symmetrises them when asked
        )
        calibrator.collect_data(_BatchReader(input_name, batches))
        table = calibrator.compute_data()
    return ranges_only(table)


def ranges_only(table: TensorsData) -> TensorsData:
    """The lowest / highest of each tensor (histograms dropped: the table keeps ranges, nothing else)."""
    data = {}
    for name, entry in table.items():
        low, high = (np.asarray(value, np.float32) for value in entry.range_value)
        data[name] = TensorData(lowest=low, highest=high)
    return TensorsData(CalibrationMethod.MinMax, data)


def merge_tables(tables: Sequence[TensorsData]) -> TensorsData:
    """Union of the ranges of several tables (each tensor: lowest of the lowests, highest of the highests).

    Tensors missing from some tables keep the ranges of the others.
    """
    if not tables:
        raise ValueError("nothing to merge")
    merged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for table in tables:
        for name, entry in table.items():
            low, high = (np.asarray(value, np.float32) for value in entry.range_value)
            if name in merged:
                low, high = np.minimum(merged[name][0], low), np.maximum(merged[name][1], high)
            merged[name] = (low, high)
    data = {name: TensorData(lowest=low, highest=high) for name, (low, high) in merged.items()}
    return TensorsData(CalibrationMethod.MinMax, data)


def write_table(table: TensorsData, path: Path) -> None:
    """Saves a table as ONNX Runtime's calibration-cache JSON (what ``calibration_cache_path`` reads)."""
    save_tensors_data(table, Path(path))


def read_table(path: Path) -> TensorsData:
    """Reads a table written by :func:`write_table`."""
    return load_tensors_data(Path(path))


def quantize_from_table(onnx_path: Path, table_path: Path, out_path: Path, scheme: QuantScheme) -> None:
    """Writes the QDQ INT8 model of ``onnx_path`` from a stored table; no image is read.

    Weights are quantised per output channel; activations take the table's ranges as ``scheme`` says.
    """
    quantize_static(
        str(onnx_path),
        str(out_path),
        calibration_data_reader=None,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=scheme.reduce_range,
        activation_type=scheme.activation_type,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True},
        calibration_cache_path=str(table_path),
    )


def mean_iou(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int) -> float:
    """mIoU in percent over classes present in the labels or the predictions (255 in labels ignored).

    Args:
        predictions: Label maps (n, H, W) per batch.
        labels: Ground truth (n, H, W) per batch.
        num_classes: Number of classes.
    """
    confusion = np.zeros((num_classes, num_classes), np.int64)  # rows: ground truth, columns: prediction
    for predicted, truth in zip(predictions, labels, strict=True):
        valid = truth != IGNORE_LABEL
        index = truth[valid].astype(np.int64) * num_classes + predicted[valid].astype(np.int64)
        confusion += np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    return float(100 * np.mean(true_positive[present] / union[present])) if present.any() else float("nan")


@dataclass(frozen=True)
class Int8Report:
    """INT8 against FP32 on the gate's images.

    Attributes:
        argmax_agreement: Fraction of pixels whose argmax class is the same.
        miou_fp32: mIoU (%) of the FP32 model, None without labels.
        miou_int8: mIoU (%) of the INT8 model, None without labels.
        miou_loss: ``miou_fp32 - miou_int8`` in points, None without labels.
        images: Number of images compared.
        min_agreement: Gate on the agreement.
        max_miou_loss: Gate on the mIoU loss (applies only with labels).
        passed: Both gates hold.
    """

    argmax_agreement: float
    miou_fp32: float | None
    miou_int8: float | None
    miou_loss: float | None
    images: int
    min_agreement: float
    max_miou_loss: float
    passed: bool

    def summary(self) -> str:
        """One line with the numbers and the thresholds."""
        miou = (
            "mIoU loss not measured (no labels)"
            if self.miou_loss is None
            else f"mIoU {self.miou_fp32:.2f} -> {self.miou_int8:.2f} (loss {self.miou_loss:.2f} points, "
            f"maximum {self.max_miou_loss:.1f})"
        )
        return (
            f"int8 vs fp32 on {self.images} images: argmax agreement {100 * self.argmax_agreement:.2f} % "
            f"(minimum {100 * self.min_agreement:.0f} %), {miou} -> {'passed' if self.passed else 'FAILED'}"
        )

    def to_dict(self) -> dict:
        """JSON-ready form (what manifests store)."""
        return {**asdict(self), "summary": self.summary()}


def compare_int8(
    fp32_logits: Sequence[np.ndarray],
    int8_logits: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None,
    min_agreement: float = INT8_MIN_AGREEMENT,
    max_miou_loss: float = INT8_MAX_MIOU_LOSS,
) -> Int8Report:
    """Applies the INT8 gate to logits (n, C, H, W) per batch of both models.

    Agreement counts every pixel of the canvas; mIoU only pixels the labels do not ignore.
    """
    fp32_labels = [logits.argmax(1) for logits in fp32_logits]  # (n, H, W)
    int8_labels = [logits.argmax(1) for logits in int8_logits]
    same = sum(int(np.count_nonzero(a == b)) for a, b in zip(fp32_labels, int8_labels, strict=True))
    agreement = same / sum(item.size for item in fp32_labels)
    miou_fp32 = miou_int8 = loss = None
    if labels is not None:
        num_classes = fp32_logits[0].shape[1]
        largest = max(int(item[item != IGNORE_LABEL].max(initial=0)) for item in labels)
        if largest >= num_classes:
            raise ValueError(
                f"the gate's masks hold label {largest} but the model has {num_classes} classes; "
                "calibrate with images of this model's dataset"
            )
        miou_fp32 = mean_iou(fp32_labels, labels, num_classes)
        miou_int8 = mean_iou(int8_labels, labels, num_classes)
        loss = miou_fp32 - miou_int8
    passed = agreement >= min_agreement and (loss is None or loss <= max_miou_loss)
    images = sum(len(item) for item in fp32_labels)
    return Int8Report(agreement, miou_fp32, miou_int8, loss, images, min_agreement, max_miou_loss, passed)
