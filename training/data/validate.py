"""Checks a whole dataset, train and val, before a step trains on it.

One pass reads every image and mask once: each image is decoded completely (so a corrupt or truncated file
shows now, not in the middle of training), its pixel count is checked from the header before decoding
(decompression bomb guard), each mask must have its image's size and hold only class indices or 255. The
labels found on the way are kept, so the step's image selection needs no second scan. A weak sample (image
labels from ``labels.csv``, no mask) contributes its image labels instead of a mask's.

Then the class list is checked against the model: at least one class must be new, and every new class must
be carried by at least one training image (pixels in its mask, or its name in its ``labels.csv`` row). For
a ``classes.txt`` the user wrote, a new class no training image carries is an error (it would be added with
nothing to learn from and an IoU of None forever); for the fixed class lists of the VOC and ADE20K layouts,
such classes are left out of the step and reported.

A step whose training split holds any weak sample is a weakly supervised step (``supervision == "weak"``);
masks are used where they exist.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from training.data.sources import (
    DataError,
    Sample,
    SegmentationSource,
    check_mask_size,
    image_size,
    load_mask,
    present_labels,
)

Supervision = Literal["full", "weak"]

MIN_TRAIN_IMAGES = 2  # batch norm needs two samples per training batch
SCAN_THREADS = min(4, os.cpu_count() or 1)  # each holds one decoded image (<= max_image_pixels x 3 B)


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`validate_dataset` found.

    Attributes:
        source: The dataset as listed.
        train_labels: Dataset class indices present in each training mask (255 excluded), in sample order;
            for a weak sample its image labels (background excluded).
        val_labels: The same for the validation samples.
        new_classes: Classes the step adds (not known to the model, with training pixels), in dataset order.
        unused_classes: Classes of a fixed class list (VOC, ADE20K) that the model does not know and no
            training image shows; the step leaves them out (their validation pixels are ignored).
        supervision: ``"weak"`` when any training sample has image-level labels only, else ``"full"``.
    """

    source: SegmentationSource
    train_labels: tuple[frozenset[int], ...]
    val_labels: tuple[frozenset[int], ...]
    new_classes: tuple[str, ...]
    unused_classes: tuple[str, ...]
    supervision: Supervision = "full"

    @property
    def new_indices(self) -> frozenset[int]:
        """Dataset class indices of :attr:`new_classes`."""
        return frozenset(self.source.classes.index(name) for name in self.new_classes)


def validate_dataset(
    source: SegmentationSource, known_classes: Sequence[str], max_image_pixels: int | None = None
) -> DatasetReport:
    """Checks every image and mask of ``source`` and its classes against a model's.

    Args:
        source: The dataset (``training.data.read_source``).
        known_classes: The base model's classes (``["background"]`` before step 0).
        max_image_pixels: Largest width x height of an image or mask; None uses
            ``PIL.Image.MAX_IMAGE_PIXELS``.

    Returns:
        The labels of every sample, the classes the step adds and the step's supervision.

    Raises:
        DataError: Naming the file and saying what to fix: an undecodable or oversized image, a mask of
            another size than its image, a mask label that is no class index nor 255, no training image,
            no new class, a new class no training image carries, fewer than two training images showing
            a new class.
    """
    if not source.train:
        raise DataError(source.root, "no training images; every image is in the validation split")
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:  # Pillow decodes outside the GIL
        train_labels = _scan_all(pool, source.train, source, max_image_pixels)
        val_labels = _scan_all(pool, source.val, source, max_image_pixels)

    class_list = source.class_file or source.root
    known = set(known_classes)
    unknown = [(index, name) for index, name in enumerate(source.classes) if index > 0 and name not in known]
    if not unknown:
        raise DataError(
            class_list,
            f"every class of the dataset ({', '.join(source.classes[1:])}) is already known to the model; "
            "a step must add at least one new class",
        )
    in_train = frozenset().union(*train_labels)
    in_val = frozenset().union(*val_labels)
    missing = [(index, name) for index, name in unknown if index not in in_train]
    if missing and source.class_file is not None:
        index, name = missing[0]
        weak = any(sample.is_weak for sample in (*source.train, *source.val))
        where = (
            "appears only in validation images; move some of them to the training split"
            if index in in_val
            else "is carried by no training image (no pixel in a mask, no labels.csv row names it); "
            "label it in the training masks or labels.csv"
            if weak
            else "has no pixel in any mask; label it in the training masks"
        )
        others = (
            f" (all {len(missing)} such classes: {', '.join(n for _, n in missing)})" if missing[1:] else ""
        )
        raise DataError(
            source.class_file,
            f"line {index + 1}: new class {name!r} (mask value {index}) {where}, or remove it from the "
            f"class list and renumber the masks{others}",
        )
    new = [(index, name) for index, name in unknown if index in in_train]
    if not new:
        raise DataError(
            source.root,
            "no training image shows a class the model does not know yet "
            f"(known: {', '.join(known_classes)}); add training images of the classes to learn",
        )
    new_indices = {index for index, _ in new}
    showing_new = sum(1 for labels in train_labels if labels & new_indices)
    if showing_new < MIN_TRAIN_IMAGES:
        raise DataError(
            source.root,
            f"only {showing_new} training image shows a new class ({', '.join(n for _, n in new)}); "
            f"a step needs at least {MIN_TRAIN_IMAGES}",
        )
    return DatasetReport(
        source=source,
        train_labels=train_labels,
        val_labels=val_labels,
        new_classes=tuple(name for _, name in new),
        unused_classes=tuple(name for _, name in missing),
        supervision="weak" if any(sample.is_weak for sample in source.train) else "full",
    )


def _scan_all(
    pool: ThreadPoolExecutor, samples: Sequence[Sample], source: SegmentationSource, max_pixels: int | None
) -> tuple[frozenset[int], ...]:
    """Scans samples in parallel; the first bad one in list order raises, and the rest are cancelled."""
    futures = [pool.submit(_scan, sample, source, max_pixels) for sample in samples]
    try:
        return tuple(future.result() for future in futures)
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def _scan(sample: Sample, source: SegmentationSource, max_pixels: int | None) -> frozenset[int]:
    """Decodes a sample's image and mask, checks them, and returns the mask's labels (a weak sample's own)."""
    size = image_size(sample.image_path, max_pixels)
    if sample.image_labels is not None:
        return sample.image_labels
    mask = load_mask(sample, len(source.classes), source.label_map, max_pixels)  # (H, W) class indices
    check_mask_size(sample, size, mask)
    return present_labels(mask)
