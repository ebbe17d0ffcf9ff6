"""The export directory's manifest, typed and checked, and atomic JSON writes.

This module needs neither torch nor onnx: a serving process reads and checks export directories with it
alone. :func:`read_manifest` validates ``manifest.json`` against :class:`ExportManifest` (a missing key or
a wrong type is reported with the file and the key) and :func:`verify_model_file` checks the ONNX file
against the sha256 the manifest recorded, so a truncated or replaced model is refused with its name before
ONNX Runtime or TensorRT ever parses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from training.durable import write_atomic

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model_fp16.onnx"
ONNX_INT8_FILE = "model_int8.onnx"
ONNX_INT8_TRT_FILE = "model_int8_trt.onnx"
CALIBRATION_FILE = "calibration.json"
MANIFEST_FORMAT = 1

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class InvalidExportError(ValueError):
    """An export directory whose manifest or model file is unreadable, malformed or not the recorded one.

    The message names the file and says what is wrong with it.
    """


class Fp16Entry(BaseModel):
    """The FP16 variant of the model, when the export has one."""

    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: Sha256
    parity: dict[str, Any]


class Int8Model(BaseModel):
    """One runtime's QDQ INT8 model and its gate.

    Attributes:
        file: The model.
        sha256: Its hash, checked at load.
        quantization: How activations and weights are quantised.
        parity: INT8 vs FP32 gate report (:class:`export.int8.Int8Report`).
        passed: The gate held; a failed INT8 model is kept for inspection but never served.
    """

    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: Sha256
    quantization: str
    parity: dict[str, Any]
    passed: bool


class Int8Entry(BaseModel):
    """The calibration table and the INT8 models quantised from it.

    Attributes:
        table: The calibration table (activation ranges per tensor; it holds no image).
        table_sha256: Its hash.
        calibration: How the table was made: method, images, tables merged in.
        cpu: The model for ONNX Runtime CPU.
        tensorrt: The model for TensorRT (explicit quantization).
    """

    model_config = ConfigDict(extra="forbid")

    table: str
    table_sha256: Sha256
    calibration: dict[str, Any]
    cpu: Int8Model
    tensorrt: Int8Model


class ExportSource(BaseModel):
    """Where the export came from (None for a bundle exported from memory)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str | None
    weights_sha256: Sha256 | None


class ExportManifest(BaseModel):
    """Contents of ``manifest.json`` (see :mod:`export.onnx_export` for the directory layout).

    Attributes:
        format: Manifest format, :data:`MANIFEST_FORMAT`.
        classes: Class names in output-channel order, index 0 = background.
        num_classes: ``len(classes)``.
        input_name: Graph input, float32 (N, 3, H, W) normalised.
        output_name: Graph output, float32 logits (N, C, H, W).
        input_size: Fixed (H, W) of the graph.
        mean: Normalisation mean (RGB, pixels scaled to 0..1).
        std: Normalisation std.
        onnx_file: File name of the FP32 model.
        onnx_sha256: Its hash, checked at load.
        fp16: The FP16 variant, or None.
        int8: The INT8 variant, or None (absent from exports made without calibration).
        model_version: Steps the model was trained for (``v<model_version>``), None when unknown.
        network_config: The BiSeNet configuration (key ``model_config`` in the file).
        parity: ONNX Runtime vs PyTorch report (see :class:`export.parity.ParityReport`).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    format: Literal[1]
    classes: list[str] = Field(min_length=1, max_length=255)
    num_classes: int = Field(ge=1)
    input_name: str
    output_name: str
    input_size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    layout: Literal["NCHW"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_range: str
    letterbox: str
    opset: int
    exporter: str
    onnx_file: str
    onnx_sha256: Sha256
    fp16: Fp16Entry | None
    int8: Int8Entry | None = None
    model_version: int | None
    network_config: dict[str, Any] = Field(alias="model_config")
    source: ExportSource
    versions: dict[str, str]
    parity: dict[str, Any]
    created_at: str

    @model_validator(mode="after")
    def _classes_match_count(self) -> ExportManifest:
        if self.num_classes != len(self.classes):
            raise ValueError(f"num_classes is {self.num_classes} but {len(self.classes)} classes are listed")
        return self

    @property
    def version_name(self) -> str:
        """``v<model_version>``, or the ONNX hash prefix when the version is unknown."""
        return f"v{self.model_version}" if self.model_version is not None else self.onnx_sha256[:12]

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict as stored in ``manifest.json``."""
        return self.model_dump(mode="json", by_alias=True)


def is_export_dir(path: Path) -> bool:
    """Whether ``path`` holds an export (manifest and FP32 model)."""
    return (Path(path) / MANIFEST_FILE).is_file() and (Path(path) / ONNX_FILE).is_file()


def _describe(error: ValidationError) -> str:
    """``key 'a.b': message`` for each problem pydantic found."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        problems.append(f"key {key!r}: {item['msg'].lower()}")
    return "; ".join(problems)


def read_manifest(export_dir: Path) -> ExportManifest:
    """Reads and validates ``manifest.json`` of an export directory.

    Raises:
        FileNotFoundError: ``export_dir`` is not an export directory.
        InvalidExportError: The manifest is not JSON, misses a key or has a value of the wrong type; the
            message names the file and each key.
    """
    export_dir = Path(export_dir)
    if not is_export_dir(export_dir):
        raise FileNotFoundError(
            f"{export_dir} is not an export directory (needs {MANIFEST_FILE} and {ONNX_FILE})"
        )
    path = export_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidExportError(f"{path}: unreadable manifest ({error}); re-export the model") from None
    try:
        return ExportManifest.model_validate(data)
    except ValidationError as error:
        raise InvalidExportError(f"{path}: {_describe(error)}; re-export the model") from None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_file(
    export_dir: Path, manifest: ExportManifest, fp16: bool = False, int8: str | None = None
) -> Path:
    """Checks the FP32 (or FP16, or INT8) model file against the hash the manifest recorded.

    Args:
        export_dir: The export directory.
        manifest: Its manifest (:func:`read_manifest`).
        fp16: Check ``model_fp16.onnx`` instead of ``model.onnx``.
        int8: Check the INT8 model of this target (``cpu``, ``tensorrt``) instead of ``model.onnx``.

    Returns:
        Path of the checked file.

    Raises:
        InvalidExportError: The file is missing, or truncated, corrupt or replaced (hash mismatch).
    """
    missing = f"{Path(export_dir) / MANIFEST_FILE}: the export has no {'FP16' if fp16 else 'INT8'} model"
    if fp16:
        if manifest.fp16 is None:
            raise InvalidExportError(missing)
        name, expected = manifest.fp16.file, manifest.fp16.sha256
    elif int8:
        if manifest.int8 is None:
            raise InvalidExportError(missing)
        model: Int8Model = getattr(manifest.int8, int8)
        name, expected = model.file, model.sha256
    else:
        name, expected = manifest.onnx_file, manifest.onnx_sha256
    path = Path(export_dir) / name
    try:
        actual = file_sha256(path)
    except OSError as error:
        raise InvalidExportError(
            f"{path}: cannot read the model file ({error}); re-export the model"
        ) from None
    if actual != expected:
        raise InvalidExportError(
            f"{path}: sha256 {actual[:16]}... differs from {expected[:16]}... recorded in {MANIFEST_FILE}; "
            f"the file ({path.stat().st_size} bytes) is truncated, corrupt or replaced: re-export the model"
        )
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` durably (:func:`training.durable.write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=2))
