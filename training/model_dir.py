"""The model directory: what one incremental step produces and every later consumer reads.

Layout::

    MODEL_DIR/model.json    {"format": 1, "config": BiSeNetConfig, "classes": [...],
                             "history": [StepRecord, ...], "state": [state names]}
    MODEL_DIR/weights.pt    state dict of the training model (auxiliary heads included)
    MODEL_DIR/state/NAME.pt method state (prototypes, feature memory, ...): dicts of tensors

Written atomically: into a temporary sibling, then renamed, so a crash mid-write never leaves a
half-written model where a reader looks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from training.models.bisenet import BiSeNet, BiSeNetConfig

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
STATE_DIR = "state"


def replace_dir(tmp: Path, target: Path) -> None:
    """Moves the finished directory ``tmp`` to ``target``, replacing an existing one.

    Readers see the old or the new directory, never a half-written one (a crash between the two
    renames leaves the previous version at ``.NAME.replaced``).
    """
    if target.exists():
        old = target.with_name(f".{target.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def is_model_dir(path: Path) -> bool:
    return (Path(path) / MODEL_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


@dataclass
class ModelBundle:
    """A model with its ordered class list, step history and method state.

    Attributes:
        model: The network (with auxiliary heads when loaded for training).
        classes: Class names in model order, index 0 = background.
        history: One record per step: step, classes_added, method, options, metrics, dates.
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
        """Writes the directory atomically, replacing an existing one at ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, tmp / WEIGHTS_FILE)
            (tmp / STATE_DIR).mkdir()
            for name, tensors in self.state.items():
                torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp / STATE_DIR / f"{name}.pt")
            meta = {
                "format": FORMAT_VERSION,
                "config": self.config.to_dict(),
                "classes": self.classes,
                "history": self.history,
                "state": sorted(self.state),
            }
            (tmp / MODEL_FILE).write_text(json.dumps(meta, indent=2))
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
            ValueError: The directory is of an unknown format or its files disagree.
        """
        path = Path(path)
        if not is_model_dir(path):
            raise FileNotFoundError(
                f"{path} is not a model directory (needs {MODEL_FILE} and {WEIGHTS_FILE})"
            )
        meta = json.loads((path / MODEL_FILE).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: model format {meta.get('format')!r}, this incseg reads {FORMAT_VERSION}"
            )
        model = BiSeNet(BiSeNetConfig(**meta["config"]), aux=aux)
        weights = torch.load(path / WEIGHTS_FILE, map_location=map_location, weights_only=True)
        if not aux:
            weights = {k: v for k, v in weights.items() if not k.startswith("aux_heads.")}
        model.load_state_dict(weights)
        state = {
            name: torch.load(path / STATE_DIR / f"{name}.pt", map_location=map_location, weights_only=True)
            for name in meta.get("state", [])
        }
        return cls(model, list(meta["classes"]), list(meta["history"]), state)
