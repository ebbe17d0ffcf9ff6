"""Joint transforms: exact output sizes, nearest-only mask values, joint flips, normalisation."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

MASK_VALUES = {0, 3, 7, 200}


def _odd_pair(height: int = 131, width: int = 97) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[10:60, 5:50], mask[40:120, 30:90], mask[100:, :20] = 3, 7, 200  # values far apart: blends would show
    return image, mask


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)  # (3,)


@pytest.mark.parametrize("size", [32, 64, 97, 160])
def test_train_transform_gives_exact_size_and_only_input_labels(size: int) -> None:
    image, mask = _odd_pair()
    transform = train_transform(size)
    torch.manual_seed(0)
    for _ in range(4):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, size, size) and out_image.dtype == torch.float32
        assert out_mask.shape == (size, size) and out_mask.dtype == torch.int64
        assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor
        assert set(out_mask.unique().tolist()) <= MASK_VALUES | {255}


@pytest.mark.parametrize("size", [33, 64, 160])
def test_eval_transform_gives_exact_size_and_only_input_labels(size: int) -> None:
    image, mask = _odd_pair()
    out_image, out_mask = eval_transform(size)(image, mask)
    assert out_image.shape == (3, size, size) and out_mask.shape == (size, size)
    assert out_mask.dtype == torch.int64 and 255 not in out_mask  # eval never pads
    assert set(out_mask.unique().tolist()) <= MASK_VALUES


def test_train_padding_is_ignore_in_mask_and_zero_in_image() -> None:
    image, mask = _odd_pair()
    torch.manual_seed(0)
    out_image, out_mask = train_transform(128, scale=(0.5, 0.5), jitter=0.0)(image, mask)  # 64 x 86: padded
    padding = out_mask == 255
    assert 0 < padding.float().mean() < 1
    black = _normalised((0, 0, 0))[:, None]  # (3, 1)
    torch.testing.assert_close(out_image[:, padding], black.expand(3, int(padding.sum())))


def test_flip_is_applied_to_image_and_mask_together() -> None:
    red_left = np.zeros((64, 64, 3), dtype=np.uint8)
    red_left[:, :16] = (255, 0, 0)
    red_left[:, 16:] = (0, 0, 255)
    mask = np.full((64, 64), 2, dtype=np.uint8)
    mask[:, :16] = 1  # asymmetric: a flip moves class 1 to the right
    transform = train_transform(64, scale=(1.0, 1.0), jitter=0.0)
    red = _normalised((255, 0, 0))[0]
    flipped = set()
    torch.manual_seed(0)
    for _ in range(16):
        out_image, out_mask = transform(Image.fromarray(red_left), mask)
        torch.testing.assert_close(out_image[0] == red, out_mask == 1, rtol=0, atol=0)
        flipped.add(bool(out_mask[0, -1] == 1))
    assert flipped == {True, False}


def test_eval_transform_center_crops_and_normalises() -> None:
    image = Image.new("RGB", (64, 128), (10, 120, 250))  # (W, H): crop keeps rows 32..95
    mask = np.repeat(np.array([1, 2, 3], dtype=np.uint8), [32, 64, 32])[:, None].repeat(
        64, axis=1
    )  # (128, 64)
    out_image, out_mask = eval_transform(64)(image, mask)
    assert (out_mask == 2).all()
    torch.testing.assert_close(out_image, _normalised((10, 120, 250))[:, None, None].expand(3, 64, 64))


def test_colour_jitter_leaves_mask_alone_and_transforms_pickle() -> None:
    image, mask = _odd_pair(64, 64)
    torch.manual_seed(0)
    out_image, out_mask = train_transform(64, scale=(1.0, 1.0), jitter=0.5)(image, mask)
    reference = torch.from_numpy(mask).long()
    assert torch.equal(out_mask, reference) or torch.equal(out_mask, reference.flip(-1))
    assert callable(pickle.loads(pickle.dumps(train_transform(32))))
    with pytest.raises(ValueError, match="scale"):
        train_transform(32, scale=(2.0, 1.0))
