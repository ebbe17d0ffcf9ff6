"""Options of a training step, readable without PyTorch.

The command line builds its parser from these fields and an API-only install (no ``train`` extra)
imports them, so this module imports neither torch nor the modules that do.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, field_validator

if TYPE_CHECKING:
    import torch

# Context paths of BiSeNet (``training.models.bisenet.BACKBONES`` builds them).
BACKBONE_NAMES = ("resnet10", "resnet18", "resnet50", "resnet101")

# Iteration floor of an incremental step (see ``training.optim``): a user's step may hold 30 images, and
# the new classes need some dozens of iterations at the group rates to win their pixels, plus room for
# the poly decay (BENCHMARKS.md "Every step learns its classes").
MIN_ITERATIONS = 100


class ParamGroup(StrEnum):
    """Parts of the model that train at their own learning rate (a multiple of the step's ``lr``)."""

    BACKBONE = "backbone"
    SPATIAL_PATH = "spatial_path"
    HEAD = "head"
    CLASSIFIER = "classifier"
    NEW_CLASSES = "new_classes"


class StepOptions(BaseModel):
    """Hyper-parameters of one step (validated; the service accepts the same fields as JSON)."""

    epochs: int = Field(30, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=512)
    size: int = Field(512, ge=32, le=4096, description="training crop and evaluation size (pixels)")
    lr: float | None = Field(None, gt=0, description="default: 0.01 at step 0, 0.001 later (MiB)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    device: str = "auto"
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    workers: int = Field(0, ge=0, le=64)
    backbone: str = Field("resnet18", description=f"step 0 only: one of {sorted(BACKBONE_NAMES)}")
    context_channels: int = Field(128, ge=8)
    embed_channels: int = Field(256, ge=8)
    backbone_weights: Path | None = Field(None, description="step 0 only: local torchvision ImageNet weights")
    setting: Literal["disjoint", "overlapped", "sequential"] = "overlapped"
    lr_multipliers: dict[str, float] | None = Field(
        None,
        description="learning rate of each parameter group (backbone, spatial_path, head, classifier, "
        "new_classes) as a multiple of lr; unset groups keep the method's or the defaults",
    )
    min_iterations: int = Field(
        MIN_ITERATIONS,
        ge=0,
        le=1_000_000,
        description="iteration floor of an incremental step: a small dataset runs more epochs to reach it",
    )

    @field_validator("lr_multipliers")
    @classmethod
    def _known_groups(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        unknown = sorted(set(value or {}) - set(ParamGroup))
        if unknown:
            raise ValueError(f"unknown parameter groups {unknown}; use {[g.value for g in ParamGroup]}")
        bad = {group: rate for group, rate in (value or {}).items() if not rate > 0}
        if bad:
            raise ValueError(f"learning-rate multipliers must be > 0, got {bad}")
        return value

    def learning_rate(self, step: int) -> float:
        return self.lr if self.lr is not None else (0.01 if step == 0 else 0.001)

    def torch_device(self) -> torch.device:
        """The device to train on (``auto``: CUDA when available); needs the ``train`` extra."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
