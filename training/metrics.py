"""Segmentation metrics from a confusion matrix (as MiB's ``stream_metrics``).

IoU of a class is TP / (TP + FP + FN); a class with no ground truth and no prediction has no
IoU (NaN) and is left out of every mean. Background counts as an old class, as in the papers'
"0-15" columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix; rows are ground truth, columns predictions."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: Tensor, labels: Tensor) -> None:
        """Adds a batch: predictions and labels (B, H, W) of class indices."""
        valid = labels != self.ignore_index
        if (labels[valid] >= self.num_classes).any():
            raise ValueError(f"label >= num_classes ({self.num_classes}) in the evaluation data")
        index = labels[valid].to(torch.int64) * self.num_classes + predictions[valid].to(torch.int64)
        counts = torch.bincount(index.cpu(), minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """Per-class IoU, NaN where the class is neither in the ground truth nor predicted."""
        m = self.matrix.double().numpy()
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum().item()
        return float(self.matrix.diag().sum().item() / total) if total else float("nan")


def _nanmean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


@dataclass(frozen=True)
class SegmentationScores:
    """mIoU over old, new and all classes (fractions in [0, 1]; None when a group is empty)."""

    miou_old: float | None
    miou_new: float | None
    miou_all: float | None
    per_class_iou: dict[str, float | None]

    @classmethod
    def from_confusion(
        cls, confusion: ConfusionMatrix, class_names: Sequence[str], num_old: int
    ) -> SegmentationScores:
        """Groups IoU: classes ``0..num_old-1`` are old (background included), the rest new."""
        iou = confusion.iou()
        return cls(
            miou_old=_nanmean(iou[:num_old]),
            miou_new=_nanmean(iou[num_old:]),
            miou_all=_nanmean(iou),
            per_class_iou={
                name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, iou, strict=True)
            },
        )

    @property
    def hiou(self) -> float | None:
        """Harmonic mean of old and new mIoU (ALIFE/DKD report it)."""
        if not self.miou_old or not self.miou_new:
            return None
        return 2 * self.miou_old * self.miou_new / (self.miou_old + self.miou_new)

    def to_dict(self) -> dict:
        return {
            "miou_old": self.miou_old,
            "miou_new": self.miou_new,
            "miou_all": self.miou_all,
            "hiou": self.hiou,
            "per_class_iou": self.per_class_iou,
        }
