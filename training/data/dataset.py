"""A torch Dataset over listed samples: load, validate, relabel, transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
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
