"""Joint image + mask transforms on torchvision ``transforms.v2`` with ``tv_tensors``.

Geometric ops apply to both; masks are always resized with NEAREST (``tv_tensors.Mask``), padded with
255 (ignore) and left out of the photometric ops and the normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from training.data.sources import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PairTransform:
    """Applies a v2 pipeline to an image and its mask (a picklable callable for DataLoader workers)."""

    def __init__(self, pipeline: v2.Transform) -> None:
        self.pipeline = pipeline

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        """Transforms one pair.

        Args:
            image: RGB image of size (W, H).
            mask: uint8 array (H, W) of labels, 255 = ignore.

        Returns:
            The image float32 (3, S, S) and the mask int64 (S, S).
        """
        pair = (v2.functional.to_image(image), tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))))
        image_out, mask_out = self.pipeline(*pair)  # (3, S, S) float32, (S, S) uint8
        return image_out.as_subclass(Tensor), mask_out.as_subclass(Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline})"


def train_transform(size: int, scale: tuple[float, float] = (0.5, 2.0), jitter: float = 0.2) -> PairTransform:
    """Training augmentation: random scale, pad, random crop, horizontal flip, colour jitter, normalise.

    The shorter side is resized to a random length in ``size * scale``; the result is padded to at least
    ``size`` (image 0, mask 255) and a random ``size`` x ``size`` crop is taken. Hue is not jittered:
    colour can be what tells classes apart.

    Args:
        size: Output side S.
        scale: Range of the shorter side relative to ``size``.
        jitter: Brightness, contrast and saturation jitter strength (0 disables it).

    Returns:
        Callable (PIL image, uint8 mask (H, W)) -> (float32 (3, S, S), int64 (S, S)).
    """
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
    shorter_min = max(1, round(size * scale[0]))
    return PairTransform(
        v2.Compose(
            [
                v2.RandomResize(shorter_min, max(shorter_min, round(size * scale[1])) + 1, antialias=True),
                v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
                *_to_normalised_float(),
            ]
        )
    )


def eval_transform(size: int) -> PairTransform:
    """Evaluation preprocessing as in MiB/PLOP: resize the shorter side to ``size``, center crop, normalise.

    Args:
        size: Output side S.

    Returns:
        Callable (PIL image, uint8 mask (H, W)) -> (float32 (3, S, S), int64 (S, S)).
    """
    return PairTransform(
        v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), *_to_normalised_float()])
    )


def _to_normalised_float() -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
