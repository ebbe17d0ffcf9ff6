"""Parity gate between a reference and an exported model (DESIGN.md section 5).

ONNX Runtime (CPU, FP32) must match PyTorch within ``max_abs_tol`` on the logits and agree on the argmax
of at least ``min_agreement`` of the pixels; a TensorRT FP16 engine must agree with the ONNX model on at
least :data:`TRT_FP16_MIN_AGREEMENT` of the pixels (its logits are not compared). Inputs are synthetic
images of the project dataset format, letterboxed exactly as in serving, at several batch sizes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from export.processing import preprocess
from training.data.synth import write_synthetic_dataset

ORT_MAX_ABS_TOL = 1e-3  # of the logit scale: max(1, the largest reference |logit|); float32 error is relative
ORT_MIN_AGREEMENT = 0.999
TRT_FP16_MIN_AGREEMENT = 0.995


@dataclass(frozen=True)
class BatchParity:
    """Parity figures of one input batch."""

    batch: int
    max_abs_error: float
    argmax_agreement: float


@dataclass(frozen=True)
class ParityReport:
    """Outcome of a parity check.

    Attributes:
        max_abs_error: Largest absolute logit difference over all batches.
        logit_scale: max(1, the reference's largest absolute logit): ``max_abs_tol`` is relative to it,
            as float32 rounding is (a model whose logits reach 4000 differs between two runtimes by about
            1e-3 from rounding alone).
        argmax_agreement: Fraction of pixels (all batches) whose argmax class matches.
        per_batch: The same figures per input batch.
        max_abs_tol: Gate on ``max_abs_error / logit_scale``; None when logits are not gated (e.g. FP16
            engines).
        min_agreement: Gate on ``argmax_agreement``.
        passed: Both gates hold.
        reference: Name of the reference backend.
        candidate: Name of the checked backend.
    """

    max_abs_error: float
    logit_scale: float
    argmax_agreement: float
    per_batch: tuple[BatchParity, ...]
    max_abs_tol: float | None
    min_agreement: float
    passed: bool
    reference: str
    candidate: str

    def summary(self) -> str:
        """One line with the numbers and the thresholds."""
        tol = "not gated"
        if self.max_abs_tol is not None:
            tol = f"tolerance {self.max_abs_tol:.1e} x logit scale {self.logit_scale:.3g}"
        return (
            f"{self.candidate} vs {self.reference}: max abs logit error {self.max_abs_error:.3e} ({tol}), "
            f"argmax agreement {100 * self.argmax_agreement:.3f} % "
            f"(minimum {100 * self.min_agreement:.2f} %), "
            f"batches {[item.batch for item in self.per_batch]} -> {'passed' if self.passed else 'FAILED'}"
        )

    def to_dict(self) -> dict:
        """JSON-ready form (what manifests store)."""
        return {**asdict(self), "per_batch": [asdict(item) for item in self.per_batch]}


class ParityError(ValueError):
    """An exported model disagrees with its reference beyond the gate; carries the report."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(f"parity gate failed: {report.summary()}")
        self.report = report


def compare_logits(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    max_abs_tol: float | None,
    min_agreement: float,
    reference_name: str,
    candidate_name: str,
) -> ParityReport:
    """Compares logits (N, C, H, W) batch by batch and applies the gates."""
    per_batch, agree, total, scale = [], 0, 0, 1.0
    for ref, out in zip(reference, candidate, strict=True):
        if ref.shape != out.shape:
            raise ValueError(f"{candidate_name} returned {out.shape}, {reference_name} {ref.shape}")
        same = int(np.count_nonzero(ref.argmax(1) == out.argmax(1)))
        pixels = ref.shape[0] * ref.shape[2] * ref.shape[3]
        error = float(np.max(np.abs(ref.astype(np.float32) - out.astype(np.float32))))
        per_batch.append(BatchParity(ref.shape[0], error, same / pixels))
        scale = max(scale, float(np.max(np.abs(ref))))
        agree, total = agree + same, total + pixels
    max_abs = max(item.max_abs_error for item in per_batch)
    agreement = agree / total
    passed = agreement >= min_agreement and (max_abs_tol is None or max_abs <= max_abs_tol * scale)
    return ParityReport(
        max_abs,
        scale,
        agreement,
        tuple(per_batch),
        max_abs_tol,
        min_agreement,
        passed,
        reference_name,
        candidate_name,
    )


def run_torch(model: nn.Module, inputs_list: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Logits of ``model`` in eval mode for each batch (its training flag is restored afterwards)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return [model(torch.from_numpy(batch).to(device)).float().cpu().numpy() for batch in inputs_list]
    finally:
        model.train(was_training)


def run_onnx(onnx_path: Path, inputs_list: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Logits of an ONNX model on ONNX Runtime's CPU provider for each batch."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: batch})[0] for batch in inputs_list]


def check_parity(
    torch_model: nn.Module,
    onnx_path: Path,
    inputs_list: Sequence[np.ndarray],
    max_abs_tol: float = ORT_MAX_ABS_TOL,
    min_agreement: float = ORT_MIN_AGREEMENT,
) -> ParityReport:
    """Compares an ONNX export (ONNX Runtime CPU) with the PyTorch model it came from.

    Args:
        torch_model: The reference network (any device).
        onnx_path: The exported model.
        inputs_list: Normalised batches float32 (N, 3, H, W), e.g. from :func:`parity_inputs`.
        max_abs_tol: Largest allowed absolute logit difference, as a fraction of the logit scale
            (``ParityReport.logit_scale``).
        min_agreement: Smallest allowed fraction of pixels with the same argmax class.

    Returns:
        The report; ``passed`` tells whether the gates hold (see :func:`require_parity`).
    """
    return compare_logits(
        run_torch(torch_model, inputs_list),
        run_onnx(onnx_path, inputs_list),
        max_abs_tol,
        min_agreement,
        "torch",
        "onnxruntime-cpu",
    )


def check_agreement(
    reference: Callable[[np.ndarray], np.ndarray],
    candidate: Callable[[np.ndarray], np.ndarray],
    inputs_list: Sequence[np.ndarray],
    min_agreement: float,
    names: tuple[str, str],
) -> ParityReport:
    """Argmax-only gate between two logits functions (used for reduced-precision backends)."""
    return compare_logits(
        [reference(batch) for batch in inputs_list],
        [candidate(batch) for batch in inputs_list],
        None,
        min_agreement,
        *names,
    )


def require_parity(report: ParityReport) -> ParityReport:
    """Returns ``report`` when it passed.

    Raises:
        ParityError: With the measured numbers and the thresholds.
    """
    if not report.passed:
        raise ParityError(report)
    return report


def parity_inputs(
    size: tuple[int, int],
    batches: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
) -> list[np.ndarray]:
    """Deterministic parity batches: synthetic dataset images letterboxed to ``size`` (H, W).

    Args:
        size: Network input (H, W).
        batches: Batch sizes, one batch each.
        mean: Normalisation mean (RGB, 0..1 pixels).
        std: Normalisation std.
        seed: Seed of the synthetic dataset.

    Returns:
        One float32 array (n, 3, H, W) per entry of ``batches``.
    """
    side = min(1024, max(32, *size))
    count = sum(batches)
    with tempfile.TemporaryDirectory(prefix="incseg-parity-") as tmp:
        root = write_synthetic_dataset(Path(tmp) / "data", 8, count, 0, side, seed)
        paths = sorted((root / "images").glob("*.png"))
        images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    batch, _ = preprocess(images, size, mean, std)
    bounds = np.cumsum([0, *batches])
    return [batch[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
