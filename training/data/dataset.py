"""Torch Datasets over listed samples: load, validate, relabel, transform.

``SegmentationDataset`` serves (image, mask) pairs; ``WeakSegmentationDataset`` serves ``WeakItem`` for steps
with image-level labels (weak supervision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from training.data.sources import IGNORE, Sample, check_mask_size, load_image, load_mask

PairCallable = Callable[[Image.Image, np.ndarray], tuple[Tensor, Tensor]]


class SegmentationDataset(Dataset[tuple[Tensor, Tensor]]):
    """Samples of one split as (image, mask) tensors.

    Args:
        samples: The samples to serve.
        num_classes: Number of source classes including background (validates mask labels).
        label_lut: uint8 array (256,) mapping source class index -> training label (255 -> 255), e.g.
            the protocol's per-step relabelling; None keeps source indices.
        transform: Callable (PIL image, uint8 mask (H, W)) -> (float32 (3, S, S), int64 (S, S)).
        label_map: The source's raw mask value -> class index table (``SegmentationSource.label_map``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        label_lut: np.ndarray | None,
        transform: PairCallable,
        label_map: Sequence[int] | None = None,
    ) -> None:
        if label_lut is not None and (
            label_lut.shape != (256,) or label_lut.dtype != np.uint8 or label_lut[IGNORE] != IGNORE
        ):
            raise ValueError(
                f"label_lut must be a uint8 array of shape (256,) with lut[255] == 255, "
                f"got dtype {label_lut.dtype}, shape {label_lut.shape}"
            )
        self.samples = tuple(samples)
        self.num_classes = num_classes
        self.label_lut = label_lut
        self.transform = transform
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Loads sample ``index``.

        Returns:
            The image float32 (3, S, S) and the mask int64 (S, S).

        Raises:
            DataError: When a file is bad or the image and mask sizes differ.
        """
        sample = self.samples[index]
        image = load_image(sample.image_path)
        mask = load_mask(sample, self.num_classes, self.label_map)  # (H, W) uint8 source class indices
        check_mask_size(sample, image.size, mask)
        if self.label_lut is not None:
            mask = self.label_lut[mask]  # (H, W) uint8 training labels
        return self.transform(image, mask)


class WeakItem(NamedTuple):
    """One training item of a step that has image-level labels (weak supervision), masked or not.

    ``default_collate`` stacks a list of these into one ``WeakItem`` of batched tensors, so the type of a
    batch says which kind of step it comes from: ``(image, mask)`` pairs for fully supervised steps,
    ``WeakItem`` for steps with image-level labels (mixed batches: masks where they exist).

    Attributes:
        image: float32 (3, S, S) normalised image; batched (B, 3, S, S).
        mask: int64 (S, S) training labels; all 255 (ignore) for a weak sample; batched (B, S, S).
        image_labels: float32 (C,) multi-hot over the step's training label space (model indices;
            index 0, background, always 0): the classes the image shows, from its ``labels.csv`` row
            or, for a masked sample, from its mask; batched (B, C).
        weak: bool () True for a sample without a mask; batched (B,).
    """

    image: Tensor
    mask: Tensor
    image_labels: Tensor
    weak: Tensor


class WeakSegmentationDataset(Dataset[WeakItem]):
    """Samples of a weakly supervised step (any mix of masked and image-label samples) as ``WeakItem``.

    Args:
        samples: The samples to serve; weak ones (``Sample.is_weak``) carry ``image_labels``.
        num_classes: Number of source classes including background (validates mask labels).
        label_lut: uint8 array (256,) mapping source class index -> training label (255 -> 255); it maps
            masks and image labels alike, so a class the step labels background (0) is no image label.
        num_labels: Size C of the training label space (the new model's classes, background included).
        transform: Callable (PIL image, uint8 mask (H, W)) -> (float32 (3, S, S), int64 (S, S)); a weak
            sample goes through it with an all-255 mask, so crops and flips treat both kinds alike.
        label_map: The source's raw mask value -> class index table (``SegmentationSource.label_map``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        label_lut: np.ndarray,
        num_labels: int,
        transform: PairCallable,
        label_map: Sequence[int] | None = None,
    ) -> None:
        self.pairs = SegmentationDataset(samples, num_classes, label_lut, transform, label_map)
        if int(label_lut[label_lut != IGNORE].max(initial=0)) >= num_labels:
            raise ValueError(f"label_lut maps to labels >= num_labels ({num_labels})")
        self.num_labels = num_labels

    @property
    def samples(self) -> tuple[Sample, ...]:
        return self.pairs.samples

    def __len__(self) -> int:
        return len(self.pairs)

    def image_labels(self, index: int) -> frozenset[int]:
        """The training labels (1..C-1) image ``index`` shows: its row's classes, or its mask's.

        Raises:
            DataError: When the sample's mask is bad.
        """
        sample, lut = self.pairs.samples[index], self.pairs.label_lut
        assert lut is not None  # set in __init__
        if sample.image_labels is not None:
            source = np.fromiter(sample.image_labels, dtype=np.int64, count=len(sample.image_labels))
        else:
            source = load_mask(sample, self.pairs.num_classes, self.pairs.label_map).ravel()
        labels = set(np.unique(lut[source]).tolist())
        return frozenset(labels - {0, IGNORE})

    def __getitem__(self, index: int) -> WeakItem:
        """Loads sample ``index``.

        Raises:
            DataError: When a file is bad or the image and mask sizes differ.
        """
        sample = self.pairs.samples[index]
        multi_hot = torch.zeros(self.num_labels)  # (C,)
        multi_hot[sorted(self.image_labels(index))] = 1.0
        if not sample.is_weak:
            image, mask = self.pairs[index]
        else:
            picture = load_image(sample.image_path)
            blank = np.full((picture.size[1], picture.size[0]), IGNORE, dtype=np.uint8)  # (H, W)
            image, mask = self.pairs.transform(picture, blank)
        return WeakItem(image, mask, multi_hot, torch.tensor(sample.is_weak))
