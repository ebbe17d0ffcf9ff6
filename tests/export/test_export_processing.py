"""Shared pre/post-processing: letterbox geometry, label round trips, colours, backend-independence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.processing import (
    Letterbox,
    class_areas,
    letterbox_image,
    letterbox_labels,
    mask_image,
    overlay,
    postprocess,
    preprocess,
    resize_nearest,
    unletterbox,
    voc_palette,
)
from export.runtime import open_runtime
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _blocks(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A label map of random 0..4 blocks of a few pixels, so borders are everywhere."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 5, ((shape[0] + 3) // 4, (shape[1] + 3) // 4), dtype=np.uint8)
    return np.kron(coarse, np.ones((4, 4), np.uint8))[: shape[0], : shape[1]]


@pytest.mark.parametrize(
    ("original", "canvas", "expected"),
    [
        ((97, 131), (512, 512), (66, 0, 379, 512)),
        ((300, 20), (512, 512), (0, 239, 512, 34)),
        ((100, 100), (97, 131), (0, 17, 97, 97)),
        ((1000, 700), (97, 131), (0, 31, 97, 68)),
    ],
)
def test_letterbox_geometry(original, canvas, expected) -> None:
    box = Letterbox.fit(original, canvas)
    assert box.original == original and box.canvas == canvas
    assert (box.top, box.left, box.height, box.width) == expected
    assert box.top + box.height <= canvas[0] and box.left + box.width <= canvas[1]


@pytest.mark.parametrize("shape", [(97, 131), (300, 20), (64, 64)])
def test_label_round_trip_is_exact_when_upscaled(shape) -> None:
    labels = _blocks(shape, seed=sum(shape))
    box = Letterbox.fit(shape, (512, 512))
    canvas = letterbox_labels(labels, box, fill=255)
    assert canvas.shape == (512, 512)
    assert (canvas == 255).sum() == 512 * 512 - box.height * box.width  # only the border is padding
    assert np.array_equal(unletterbox(canvas, box), labels)


def test_label_round_trip_when_downscaled_keeps_size_and_most_pixels() -> None:
    labels = np.kron(_blocks((40, 28), seed=3), np.ones((25, 25), np.uint8))  # (1000, 700), 100 px blocks
    box = Letterbox.fit(labels.shape, (97, 131))
    back = unletterbox(letterbox_labels(labels, box), box)
    assert back.shape == labels.shape
    assert (back == labels).mean() > 0.9


def test_resize_nearest_samples_pixel_centres() -> None:
    labels = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(resize_nearest(labels, (4, 6)), np.kron(labels, np.ones((2, 2), np.uint8)))
    assert np.array_equal(resize_nearest(np.kron(labels, np.ones((2, 2), np.uint8)), (2, 3)), labels)


def test_letterbox_image_normalises_and_pads_with_zeros() -> None:
    grey = np.full((30, 90, 3), 128, np.uint8)
    array, box = letterbox_image(grey, (64, 64), MEAN, STD)
    assert array.shape == (3, 64, 64) and array.dtype == np.float32
    inside = array[:, box.top : box.top + box.height, box.left : box.left + box.width]
    expected = (128 / 255 - np.array(MEAN)) / np.array(STD)
    assert np.allclose(inside, expected[:, None, None], atol=1e-5)
    assert np.count_nonzero(array) == 3 * box.height * box.width  # border exactly zero (= the mean colour)
    with pytest.raises(ValueError, match="RGB uint8"):
        letterbox_image(grey[..., 0], (64, 64), MEAN, STD)


def test_postprocess_returns_original_sizes() -> None:
    images = [np.zeros((97, 131, 3), np.uint8), np.zeros((300, 20, 3), np.uint8)]
    batch, boxes = preprocess(images, (64, 48), MEAN, STD)
    assert batch.shape == (2, 3, 64, 48)
    masks = postprocess(np.ones((2, 64, 48), np.int64), boxes)
    assert [mask.shape for mask in masks] == [(97, 131), (300, 20)]
    assert all(mask.dtype == np.uint8 and (mask == 1).all() for mask in masks)


def test_palette_mask_overlay_and_areas() -> None:
    palette = voc_palette()
    assert palette.shape == (256, 3)
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert len({tuple(colour) for colour in palette}) == 256
    labels = np.array([[0, 1], [2, 2]], np.uint8)
    image = mask_image(labels)
    assert image.mode == "P" and np.array_equal(np.asarray(image), labels)
    rgb = np.full((2, 2, 3), 200, np.uint8)
    blended = overlay(rgb, labels, alpha=0.5)
    assert blended[0, 0].tolist() == [200, 200, 200]  # background untouched
    assert blended[0, 1].tolist() == [164, 100, 100]
    areas = class_areas(labels, ["background", "cat", "dog"])
    assert areas == {"dog": 50.0, "background": 25.0, "cat": 25.0}


@pytest.mark.parametrize(("source", "size"), [((22, 32), (37, 53)), ((37, 53), (22, 32)), ((5, 7), (500, 3))])
def test_areas_of_a_resize_are_counted_without_building_it(
    source: tuple[int, int], size: tuple[int, int]
) -> None:
    labels = _blocks(source, seed=3)[: source[0], : source[1]] % 3
    classes = ["background", "cat", "dog"]
    expected = class_areas(resize_nearest(labels, size), classes)
    assert class_areas(labels, classes, size) == pytest.approx(expected)
    assert list(class_areas(labels, classes, size)) == list(expected)


def test_torch_and_ort_cpu_give_identical_masks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BiSeNet(BiSeNetConfig(num_classes=4, backbone="resnet10", context_channels=16, embed_channels=16))
    with torch.no_grad():
        model.head.classifier.weight.mul_(50)  # spread a random model's predictions over several classes
    ModelBundle(model, ["background", "a", "b", "c"]).save(tmp_path / "model")
    rng = np.random.default_rng(0)
    images = [
        np.kron(
            rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8),
            np.ones((8, 8, 1), np.uint8),
        )[:h, :w]
        for h, w in [(97, 131), (300, 20), (64, 64)]
    ]
    results = {}
    for backend in ("torch", "ort-cpu"):
        with open_runtime(tmp_path / "model", backend, size=(97, 131)) as runtime:
            results[backend] = runtime.predict(images)
    assert [mask.shape for mask in results["torch"]] == [(97, 131), (300, 20), (64, 64)]
    assert len(np.unique(np.concatenate([mask.ravel() for mask in results["torch"]]))) > 1
    for ours, theirs in zip(results["torch"], results["ort-cpu"], strict=True):
        assert np.array_equal(ours, theirs)
