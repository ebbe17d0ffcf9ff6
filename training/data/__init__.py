"""Dataset readers, validation, joint transforms, the torch Dataset and the synthetic dataset writer.

The readers, the validation and the synthetic writer need only numpy and Pillow; the torch Dataset and the
transforms are imported on first use, so the API process can validate an upload without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from training.data.sources import (
    IGNORE,
    DataError,
    Sample,
    SegmentationSource,
    check_mask_size,
    image_size,
    label_sets,
    load_image,
    load_mask,
    present_labels,
    read_ade20k,
    read_folder_dataset,
    read_source,
    read_voc,
)
from training.data.synth import masks_to_image_labels, write_synthetic_dataset
from training.data.validate import DatasetReport, validate_dataset

if TYPE_CHECKING:
    from training.data.dataset import SegmentationDataset, WeakItem, WeakSegmentationDataset
    from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

_TORCH_MODULE_OF = {
    "SegmentationDataset": "training.data.dataset",
    "WeakItem": "training.data.dataset",
    "WeakSegmentationDataset": "training.data.dataset",
    "IMAGENET_MEAN": "training.data.transforms",
    "IMAGENET_STD": "training.data.transforms",
    "eval_transform": "training.data.transforms",
    "train_transform": "training.data.transforms",
}


def __getattr__(name: str) -> Any:
    """Imports the torch-dependent names on first access (PEP 562)."""
    if name not in _TORCH_MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_TORCH_MODULE_OF[name]), name)


__all__ = [
    "IGNORE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "DatasetReport",
    "Sample",
    "SegmentationDataset",
    "SegmentationSource",
    "check_mask_size",
    "eval_transform",
    "image_size",
    "label_sets",
    "load_image",
    "load_mask",
    "masks_to_image_labels",
    "present_labels",
    "read_ade20k",
    "read_folder_dataset",
    "read_source",
    "read_voc",
    "train_transform",
    "validate_dataset",
    "WeakItem",
    "WeakSegmentationDataset",
    "write_synthetic_dataset",
]
