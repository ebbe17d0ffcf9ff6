"""Dataset readers, joint transforms, the torch Dataset and the synthetic dataset writer."""

from training.data.dataset import SegmentationDataset
from training.data.sources import (
    IGNORE,
    DataError,
    Sample,
    SegmentationSource,
    label_sets,
    load_image,
    load_mask,
    read_ade20k,
    read_folder_dataset,
    read_source,
    read_voc,
)
from training.data.synth import write_synthetic_dataset
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "IGNORE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "Sample",
    "SegmentationDataset",
    "SegmentationSource",
    "eval_transform",
    "label_sets",
    "load_image",
    "load_mask",
    "read_ade20k",
    "read_folder_dataset",
    "read_source",
    "read_voc",
    "train_transform",
    "write_synthetic_dataset",
]
