"""The model directory: what one incremental step produces and every later consumer reads.

Layout::

    MODEL_DIR/model.json    {"format": 1, "config": BiSeNetConfig, "classes": [...],
                             "history": [StepRecord, ...], "state": [state names]}   (ModelFile)
    MODEL_DIR/weights.pt    state dict of the training model (auxiliary heads included)
    MODEL_DIR/state/NAME.pt method state (prototypes, feature memory, ...): dicts of tensors

Written into a uniquely named temporary sibling, every file and directory fsynced, then renamed into
place, so a crash never leaves a half-written model where a reader looks and two writers to one path
never share a temporary name. Replacing an *existing* directory takes two renames, during which the path
is briefly absent: readers that must never see a gap (the service) publish new directories under new
names instead (``service.registry``). Directories are world-readable (0755), not ``mkdtemp``'s 0700.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import shutil
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor

from training.durable import fsync_path, sync_tree
from training.models.bisenet import BiSeNet, BiSeNetConfig

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
STATE_DIR = "state"
REPLACE_ATTEMPTS = 100


class ModelFile(BaseModel):
    """``model.json``, validated so that a damaged file names the key at fault."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1]
    config: dict[str, Any] = Field(description="BiSeNetConfig fields")
    classes: list[str] = Field(min_length=1)
    history: list[dict[str, Any]]
    state: list[str] = Field(default_factory=list)

    @field_validator("config")
    @classmethod
    def _config_keys(cls, config: dict[str, Any]) -> dict[str, Any]:
        known = {item.name: item for item in dataclasses.fields(BiSeNetConfig)}
        extra = sorted(set(config) - set(known))
        if extra:
            raise ValueError(f"unknown key(s) {', '.join(extra)}; BiSeNetConfig has {', '.join(known)}")
        missing = [
            name
            for name, item in known.items()
            if name not in config
            and item.default is dataclasses.MISSING
            and item.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"missing key(s) {', '.join(missing)}")
        return config

    @model_validator(mode="after")
    def _classes_match_config(self) -> ModelFile:
        if len(self.classes) != self.config["num_classes"]:
            raise ValueError(
                f"{len(self.classes)} class names for config.num_classes = {self.config['num_classes']}"
            )
        repeated = sorted({name for name in self.classes if self.classes.count(name) > 1})
        if repeated:
            raise ValueError(
                f"classes repeat {repeated}; class names must be unique (they key the per-class IoU)"
            )
        return self

    def bisenet_config(self) -> BiSeNetConfig:
        """The architecture (its own checks raise ValueError/TypeError on bad values)."""
        return BiSeNetConfig(**self.config)


def replace_dir(tmp: Path, target: Path) -> None:
    """Moves the finished directory ``tmp`` to ``target``, replacing an existing one.

    ``tmp``'s files are fsynced first, and the parent directory after. Readers see the old or the new
    directory, or (between the two renames of a replacement) none; never a half-written one. Concurrent
    writers to one ``target`` each move the current directory aside under a unique name and retry, so
    the last rename wins and none fails.

    Raises:
        OSError: ``target`` could not be replaced after many attempts.
    """
    sync_tree(tmp)
    for _ in range(REPLACE_ATTEMPTS):
        try:
            os.rename(tmp, target)  # fails on an existing non-empty directory
            break
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex}")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            continue  # another writer moved it aside first
        shutil.rmtree(old, ignore_errors=True)
    else:
        raise OSError(errno.EBUSY, f"could not replace {target} after {REPLACE_ATTEMPTS} attempts")
    fsync_path(target.parent)


def is_model_dir(path: Path) -> bool:
    return (Path(path) / MODEL_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def read_model_file(path: Path) -> ModelFile:
    """Reads and validates ``model.json`` of a model directory.

    Raises:
        ValueError: The file is not JSON, of another format, or a key is missing, extra or wrong; the
            message names the file and the key.
    """
    file = Path(path) / MODEL_FILE
    try:
        return ModelFile.model_validate_json(file.read_bytes())
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc'])) or 'file'}: {item['msg']}" for item in err.errors()
        )
        raise ValueError(f"{file}: {problems}") from None


def _load_tensors(file: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    """``torch.load`` with a message that names the file when it is truncated or not a tensor file."""
    try:
        value = torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{file}: missing (listed in {MODEL_FILE})") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(
            f"{file}: cannot be read ({err}); the file is truncated or not a weights file"
        ) from None
    if not isinstance(value, dict) or not all(isinstance(v, Tensor) for v in value.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return value


def supervision_of(record: dict[str, Any]) -> Literal["full", "weak"]:
    """A step record's supervision: "weak" for image-level labels; records from before weak steps: "full"."""
    return "weak" if record.get("supervision") == "weak" else "full"


@dataclass
class ModelBundle:
    """A model with its ordered class list, step history and method state.

    Attributes:
        model: The network (with auxiliary heads when loaded for training).
        classes: Class names in model order, index 0 = background.
        history: One record per step: step, classes_added, method, supervision ("full" or "weak";
            see ``supervision_of``), options, metrics, dates.
        state: Method state by name (e.g. ``prototypes``), each a dict of tensors.
    """

    model: BiSeNet
    classes: list[str]
    history: list[dict] = field(default_factory=list)
    state: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) != self.model.num_classes:
            raise ValueError(
                f"{len(self.classes)} class names for a model with {self.model.num_classes} outputs"
            )

    @property
    def config(self) -> BiSeNetConfig:
        return self.model.config

    @property
    def version(self) -> int:
        """Number of steps trained so far (step 0 gives version 1)."""
        return len(self.history)

    def save(self, path: Path) -> Path:
        """Writes the directory (fsynced, 0755) and moves it to ``path``, replacing an existing one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, tmp / WEIGHTS_FILE)
            (tmp / STATE_DIR).mkdir()
            for name, tensors in self.state.items():
                torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp / STATE_DIR / f"{name}.pt")
            meta = ModelFile(
                format=FORMAT_VERSION,
                config=self.config.to_dict(),
                classes=self.classes,
                history=self.history,
                state=sorted(self.state),
            )
            (tmp / MODEL_FILE).write_text(meta.model_dump_json(indent=2))
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path, aux: bool = False, map_location: str | torch.device = "cpu") -> ModelBundle:
        """Reads a model directory; ``aux=True`` keeps the auxiliary heads (to continue training).

        Raises:
            FileNotFoundError: ``path`` is not a model directory.
            ValueError: A file is damaged (truncated weights, a bad or incomplete ``model.json``, weights
                that do not fit the config); the message names the file.
        """
        path = Path(path)
        if not is_model_dir(path):
            raise FileNotFoundError(
                f"{path} is not a model directory (needs {MODEL_FILE} and {WEIGHTS_FILE})"
            )
        meta = read_model_file(path)
        try:
            model = BiSeNet(meta.bisenet_config(), aux=aux)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path / MODEL_FILE}: config: {err}") from None
        weights = _load_tensors(path / WEIGHTS_FILE, map_location)
        if not aux:
            weights = {k: v for k, v in weights.items() if not k.startswith("aux_heads.")}
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(
                f"{path / WEIGHTS_FILE}: does not fit the config of {MODEL_FILE}: {err}"
            ) from None
        state = {name: _load_tensors(path / STATE_DIR / f"{name}.pt", map_location) for name in meta.state}
        return cls(model, list(meta.classes), list(meta.history), state)
