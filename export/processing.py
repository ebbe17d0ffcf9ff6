"""Pre- and post-processing shared by every runtime backend: letterbox, normalise, unletterbox, colours.

Every backend runs the same network on the same fixed ``H x W`` canvas, so the only backend-specific part of
serving is the forward pass itself. An image is resized keeping its aspect ratio to fit the canvas (PIL
bilinear), centred, normalised with the model's mean and std, and the border is filled with zeros *after*
normalisation (i.e. the mean colour). :class:`Letterbox` remembers where the image went; post-processing
crops that region of the per-pixel argmax and resizes it back to the original size with nearest neighbour.

Nearest resizing of label maps uses explicit pixel-centre index maps (``src = floor((dst + 0.5) * in / out)``)
in both directions, so a label map scaled up onto the canvas and back comes out unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Letterbox:
    """Where an image of ``original`` size was placed on the canvas.

    Attributes:
        original: (height, width) of the input image.
        canvas: (H, W) of the network input.
        top: First canvas row covered by the image.
        left: First canvas column covered by the image.
        height: Canvas rows covered by the image.
        width: Canvas columns covered by the image.
    """

    original: tuple[int, int]
    canvas: tuple[int, int]
    top: int
    left: int
    height: int
    width: int

    @classmethod
    def fit(cls, original: tuple[int, int], canvas: tuple[int, int]) -> Letterbox:
        """Largest aspect-preserving placement of ``original`` centred on ``canvas``."""
        (h, w), (ch, cw) = original, canvas
        if min(h, w, ch, cw) < 1:
            raise ValueError(f"sizes must be positive, got image {original} and canvas {canvas}")
        scale = min(ch / h, cw / w)
        height = min(ch, max(1, round(h * scale)))
        width = min(cw, max(1, round(w * scale)))
        return cls((h, w), (ch, cw), (ch - height) // 2, (cw - width) // 2, height, width)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel for a nearest resize sampling at pixel centres."""
    return np.minimum((np.arange(size_out) + 0.5) * size_in / size_out, size_in - 1).astype(np.intp)


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (H, W) to ``size`` = (height, width)."""
    rows = _nearest_indices(labels.shape[0], size[0])
    cols = _nearest_indices(labels.shape[1], size[1])
    return labels[rows[:, None], cols[None, :]]


def letterbox_image(
    image: np.ndarray, canvas: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, Letterbox]:
    """Letterboxes and normalises one image.

    Args:
        image: RGB uint8 (h, w, 3).
        canvas: Network input (H, W).
        mean: Per-channel RGB mean for pixels scaled to 0..1.
        std: Per-channel RGB std for pixels scaled to 0..1.

    Returns:
        The normalised image float32 (3, H, W) with a zero border, and its placement.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (h, w, 3), got {image.dtype} {image.shape}")
    box = Letterbox.fit(image.shape[:2], canvas)
    resized = image
    if (box.height, box.width) != image.shape[:2]:
        placed = Image.fromarray(image).resize((box.width, box.height), Image.Resampling.BILINEAR)
        resized = np.asarray(placed)
    mean_rgb, std_rgb = np.asarray(mean, np.float32), np.asarray(std, np.float32)  # (3,)
    normalised = (resized.astype(np.float32) / 255.0 - mean_rgb) / std_rgb
    out = np.zeros((3, *canvas), dtype=np.float32)
    out[:, box.top : box.top + box.height, box.left : box.left + box.width] = normalised.transpose(2, 0, 1)
    return out, box


def preprocess(
    images: Sequence[np.ndarray], canvas: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, list[Letterbox]]:
    """Letterboxes a list of RGB uint8 images into one batch float32 (N, 3, H, W)."""
    pairs = [letterbox_image(image, canvas, mean, std) for image in images]
    return np.stack([array for array, _ in pairs]), [box for _, box in pairs]


def letterbox_labels(labels: np.ndarray, box: Letterbox, fill: int = 0) -> np.ndarray:
    """Places a label map (h, w) on the canvas like :func:`letterbox_image` places its image."""
    out = np.full(box.canvas, fill, dtype=labels.dtype)
    out[box.top : box.top + box.height, box.left : box.left + box.width] = resize_nearest(
        labels, (box.height, box.width)
    )
    return out


def unletterbox(labels: np.ndarray, box: Letterbox) -> np.ndarray:
    """Crops the image region of a canvas label map (H, W) and resizes it to the original (h, w)."""
    region = labels[box.top : box.top + box.height, box.left : box.left + box.width]
    return resize_nearest(region, box.original)


def postprocess(labels: np.ndarray, boxes: Sequence[Letterbox]) -> list[np.ndarray]:
    """Canvas label maps (N, H, W) -> one uint8 label map per image at its original size."""
    return [unletterbox(item, box).astype(np.uint8) for item, box in zip(labels, boxes, strict=True)]


def voc_palette(count: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: uint8 (count, 3), class 0 black, bits of the index spread over RGB."""
    palette = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def mask_image(labels: np.ndarray) -> Image.Image:
    """A label map (H, W) as a palette ("P" mode) PIL image with VOC colours; pixel values stay labels."""
    image = Image.fromarray(labels.astype(np.uint8, copy=False))
    image.putpalette(voc_palette().tobytes())  # turns the "L" image into "P"
    return image


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends VOC colours of the non-background labels over an RGB uint8 image (H, W, 3)."""
    colours = voc_palette()[labels].astype(np.float32)
    blended = image.astype(np.float32) * (1 - alpha) + colours * alpha
    return np.where((labels > 0)[..., None], blended, image).round().astype(np.uint8)


def class_areas(
    labels: np.ndarray, classes: Sequence[str], size: tuple[int, int] | None = None
) -> dict[str, float]:
    """Percentage of pixels per class name (classes with no pixels are left out), largest first.

    Args:
        labels: A label map (h, w).
        classes: Class names by label value.
        size: (height, width): the areas of ``resize_nearest(labels, size)``, counted without building it
            (each source pixel weighs the output rows times the output columns it is copied to).
    """
    if size is None:
        counts = np.bincount(labels.ravel(), minlength=len(classes))
        total = labels.size
    else:
        rows = np.bincount(_nearest_indices(labels.shape[0], size[0]), minlength=labels.shape[0])
        cols = np.bincount(_nearest_indices(labels.shape[1], size[1]), minlength=labels.shape[1])
        weights = np.outer(rows, cols).ravel()
        counts = np.bincount(labels.ravel(), weights=weights, minlength=len(classes))
        total = size[0] * size[1]
    total = max(1, total)
    areas = {
        (classes[index] if index < len(classes) else str(index)): 100.0 * count / total
        for index, count in enumerate(counts)
        if count
    }
    return dict(sorted(areas.items(), key=lambda item: -item[1]))
