"""Exports a model directory to an ONNX export directory, gated by a parity check.

Export directory layout::

    OUT/model.onnx        input ``images`` float32 (N, 3, H, W), normalised; output ``logits`` (N, C, H, W)
                          at a fixed H x W with a dynamic batch dimension; standard ONNX ops only
    OUT/model_fp16.onnx   (``fp16=True``) FP16 weights and compute with FP32 inputs/outputs, for GPU runtimes
    OUT/calibration.json  (``int8=``) activation ranges per tensor (ONNX Runtime calibration-cache JSON, no
                          image), measured on the calibration images and merged with earlier tables
    OUT/model_int8.onnx   (``int8=``) QDQ INT8 for ONNX Runtime CPU, quantised from calibration.json alone
    OUT/model_int8_trt.onnx (``int8=``) the same with symmetric activations, for TensorRT (:mod:`export.int8`)
    OUT/manifest.json     classes, input size, normalisation, versions, hashes and parity figures

The directory is written into a temporary sibling and renamed into place only once parity passed, so a
failed export never replaces a working one.
"""

from __future__ import annotations

import copy
import importlib.metadata
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import onnx
import onnx_ir
import onnxruntime as ort
import onnxscript.optimizer
import torch
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.int8 import (
    SCHEMES,
    Int8Calibration,
    compare_int8,
    compute_table,
    merge_tables,
    quantize_from_table,
    read_table,
    write_table,
)
from export.manifest import (
    CALIBRATION_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    ONNX_FILE,
    ONNX_FP16_FILE,
    ONNX_INT8_FILE,
    ExportManifest,
    file_sha256,
    write_json_atomic,
)
from export.parity import (
    ORT_MAX_ABS_TOL,
    ORT_MIN_AGREEMENT,
    TRT_FP16_MIN_AGREEMENT,
    ParityReport,
    check_parity,
    compare_logits,
    parity_inputs,
    require_parity,
    run_onnx,
)
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from training.model_dir import WEIGHTS_FILE, ModelBundle, replace_dir
from training.models.bisenet import BiSeNet

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        out_dir: The export directory.
        onnx_path: The FP32 model.
        fp16_path: The FP16 model, or None.
        int8_path: The INT8 model for ONNX Runtime CPU, or None (written also when it failed its gate: see
            the manifest).
        manifest: Contents of ``manifest.json`` (JSON-ready; :class:`ExportManifest` is its typed form).
        parity: ONNX Runtime vs PyTorch report of the FP32 model.
    """

    out_dir: Path
    onnx_path: Path
    fp16_path: Path | None
    manifest: dict
    parity: ParityReport
    int8_path: Path | None = None

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_FILE


def library_versions() -> dict[str, str]:
    """Versions of the libraries an export depends on."""
    try:
        incseg = importlib.metadata.version("incseg")
    except importlib.metadata.PackageNotFoundError:
        incseg = "unknown (not installed)"
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
        "incseg": incseg,
    }


def _export_graph(model: BiSeNet, path: Path, size: tuple[int, int], opset: int) -> None:
    """Traces ``model`` to ONNX at a fixed H x W with a dynamic batch, then cleans the graph.

    ``dynamo=False`` (TorchScript tracing) is chosen on purpose: with torch 2.14 the dynamo exporter only
    implements opset >= 18 (its down-conversion to 17 fails on ReduceMean and silently keeps 18) and takes
    ~4x longer; the traced graph, after onnxscript's optimiser removes the Identity/Constant clutter, holds
    only Conv, Relu, Add, Mul, Sigmoid, ReduceMean, MaxPool, Concat, Resize and the shape ops that carry
    the dynamic batch into Resize, and passes parity at batches 1..N.
    """
    example = torch.zeros(1, 3, *size)
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notice, and the tracer noting that the model's shape check
        # (odd sizes on the two BiSeNet paths) becomes a constant: correct here, as H x W is fixed
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnxscript.optimizer.optimize(onnx.load(str(path)))
    # the tracer leaves the output's C, H, W symbolic (they come out of a Resize); declare them
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(dims[1:], (model.num_classes, *size), strict=True):
        dim.dim_value = value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _write_fp16(onnx_path: Path, out_path: Path) -> None:
    """FP16 weights and compute with FP32 graph inputs/outputs (onnxruntime's float16 converter)."""
    converted = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    ir_model = onnx_ir.from_proto(converted)
    ir_model.graph.sort()  # the converter appends the input casts after their consumers
    proto = onnx_ir.to_proto(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(out_path))


def _write_int8(out_dir: Path, int8: Int8Calibration) -> dict:
    """Measures the table, merges earlier ones, quantises each runtime's model from it and gates each.

    Returns:
        The manifest's ``int8`` entry.
    """
    onnx_path, table_path = out_dir / ONNX_FILE, out_dir / CALIBRATION_FILE
    measured = compute_table(onnx_path, int8.calibration.batches, int8.method)
    write_table(merge_tables([measured, *(read_table(path) for path in int8.earlier_tables)]), table_path)
    batches, labels = int8.evaluation.batches, int8.evaluation.labels
    fp32 = run_onnx(onnx_path, batches)
    models = {}
    for scheme in SCHEMES:
        quantize_from_table(onnx_path, table_path, out_dir / scheme.file, scheme)
        report = compare_int8(fp32, run_onnx(out_dir / scheme.file, batches), labels)
        models[scheme.target] = {
            "file": scheme.file,
            "sha256": file_sha256(out_dir / scheme.file),
            "quantization": scheme.description,
            "parity": report.to_dict(),
            "passed": report.passed,
        }
    calibration = {
        "method": int8.method.name,
        "images": int8.calibration.count,
        "merged_tables": len(int8.earlier_tables),
    }
    return {
        "table": CALIBRATION_FILE,
        "table_sha256": file_sha256(table_path),
        "calibration": calibration,
        **models,
    }


def export_onnx(
    bundle_or_model_dir: ModelBundle | Path,
    out_dir: Path,
    size: tuple[int, int],
    fp16: bool = False,
    opset: int = 17,
    parity_batches: Sequence[int] = (1, 2, 4),
    max_abs_tol: float = ORT_MAX_ABS_TOL,
    min_agreement: float = ORT_MIN_AGREEMENT,
    int8: Int8Calibration | None = None,
) -> ExportResult:
    """Exports a model to ``out_dir`` after checking ONNX Runtime against PyTorch.

    Args:
        bundle_or_model_dir: A loaded bundle or a model directory (loaded without auxiliary heads; a
            bundle's auxiliary heads are not part of ``forward`` and never reach the graph).
        out_dir: Export directory to write (replaced atomically when it exists).
        size: Serving input (H, W); fixed in the graph.
        fp16: Also write ``model_fp16.onnx`` (FP16 weights, FP32 I/O) for GPU runtimes, gated on argmax
            agreement with the FP32 model (>= 99.5 %, checked on ONNX Runtime CPU).
        opset: ONNX opset.
        parity_batches: Batch sizes of the parity inputs.
        max_abs_tol: Parity gate on the largest absolute logit difference.
        min_agreement: Parity gate on the argmax agreement.

    Returns:
        What was written.

    Raises:
        ParityError: The export disagrees with PyTorch; nothing is written.
    """
    if isinstance(bundle_or_model_dir, ModelBundle):
        bundle, source_dir = bundle_or_model_dir, None
    else:
        source_dir = Path(bundle_or_model_dir)
        bundle = ModelBundle.load(source_dir, aux=False)
    model = copy.deepcopy(bundle.model).cpu().eval()
    size = (int(size[0]), int(size[1]))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; serving may run as another user
    try:
        onnx_path = tmp / ONNX_FILE
        _export_graph(model, onnx_path, size, opset)
        inputs = parity_inputs(size, parity_batches, IMAGENET_MEAN, IMAGENET_STD)
        report = require_parity(check_parity(model, onnx_path, inputs, max_abs_tol, min_agreement))
        fp16_entry = None
        if fp16:
            _write_fp16(onnx_path, tmp / ONNX_FP16_FILE)
            fp16_report = require_parity(
                compare_logits(
                    run_onnx(onnx_path, inputs),
                    run_onnx(tmp / ONNX_FP16_FILE, inputs),
                    None,
                    TRT_FP16_MIN_AGREEMENT,
                    "onnxruntime-cpu",
                    "onnxruntime-cpu-fp16",
                )
            )
            fp16_entry = {
                "file": ONNX_FP16_FILE,
                "sha256": file_sha256(tmp / ONNX_FP16_FILE),
                "parity": fp16_report.to_dict(),
            }
        int8_entry = _write_int8(tmp, int8) if int8 is not None else None
        manifest = ExportManifest.model_validate(
            {
                "format": MANIFEST_FORMAT,
                "classes": list(bundle.classes),
                "num_classes": len(bundle.classes),
                "input_name": INPUT_NAME,
                "output_name": OUTPUT_NAME,
                "input_size": list(size),
                "layout": "NCHW",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "pixel_range": "RGB, 0..1 before normalisation",
                "letterbox": "aspect-preserving bilinear resize, centred, zero border after normalisation",
                "opset": opset,
                "exporter": "torch.onnx.export(dynamo=False) + onnxscript.optimizer",
                "onnx_file": ONNX_FILE,
                "onnx_sha256": file_sha256(onnx_path),
                "fp16": fp16_entry,
                "int8": int8_entry,
                "model_version": bundle.version,
                "model_config": bundle.config.to_dict(),
                "source": {
                    "model_dir": str(source_dir.resolve()) if source_dir else None,
                    "weights_sha256": file_sha256(source_dir / WEIGHTS_FILE) if source_dir else None,
                },
                "versions": library_versions(),
                "parity": report.to_dict(),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        ).to_json()
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        replace_dir(tmp, out_dir)  # fsyncs every file, then the rename into out_dir's parent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fp16_path = out_dir / ONNX_FP16_FILE if fp16 else None
    int8_path = out_dir / ONNX_INT8_FILE if int8 is not None else None
    return ExportResult(out_dir, out_dir / ONNX_FILE, fp16_path, manifest, report, int8_path)
