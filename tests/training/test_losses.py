"""Each loss against values computed by hand from the papers' / MiB's definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    cross_entropy_over_all_pixels,
    feature_distillation,
    knowledge_distillation,
    unbiased_cross_entropy,
    unbiased_distillation,
)


def lse(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values))


def pixels(*vectors: list[float]) -> torch.Tensor:
    """(1, C, 1, N) logits from N per-pixel vectors."""
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(1, len(vectors[0]), 1, len(vectors))


def test_unbiased_cross_entropy_hand_computed() -> None:
    # C_old = 3 (bg, 1, 2), new classes 3 and 4.
    z = [[0.5, 1.0, -0.3, 2.0, 0.1], [1.5, -1.0, 0.2, 0.3, 0.9], [0.0, 0.0, 0.0, 0.0, 3.0]]
    labels = torch.tensor([[[0, 3, 255]]])  # background (incl. old), new class 3, ignored
    expected = [
        -(lse(z[0][:3]) - lse(z[0])),  # p(bg) = sum over bg + old classes
        -(z[1][3] - lse(z[1])),
    ]
    loss = unbiased_cross_entropy(pixels(*z), labels, num_old_classes=3)
    # MiB's trainer: reduction 'none' then .mean(), so the ignored pixel counts 0 in a mean over all 3
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-9)


@pytest.mark.parametrize("ignored", [0, 1, 5])
def test_unbiased_cross_entropy_averages_over_all_pixels(ignored: int) -> None:
    """Adding ignored pixels scales the loss by valid / all (fcdl94/MiB train.py 103-107)."""
    z = torch.randn(1, 4, 1, 3 + ignored, dtype=torch.float64)
    labels = torch.tensor([[[0, 2, 3] + [255] * ignored]])
    valid_only = unbiased_cross_entropy(z[..., :3], labels[..., :3], num_old_classes=3)
    loss = unbiased_cross_entropy(z, labels, num_old_classes=3)
    assert loss.item() == pytest.approx(valid_only.item() * 3 / (3 + ignored), rel=1e-12)


def test_cross_entropy_over_all_pixels() -> None:
    z = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    labels = torch.tensor([[[0, 1], [255, 2]], [[255, 255], [1, 1]]])
    per_pixel = F.cross_entropy(z, labels, ignore_index=255, reduction="none")
    assert cross_entropy_over_all_pixels(z, labels).item() == pytest.approx(per_pixel.sum().item() / 8)
    assert cross_entropy_over_all_pixels(z, torch.full_like(labels, 255)).item() == 0.0


def test_unbiased_cross_entropy_old_labels_count_as_background() -> None:
    z = pixels([0.3, 0.2, 1.1, -0.4])
    old_label = unbiased_cross_entropy(z, torch.tensor([[[1]]]), num_old_classes=2)
    bg_label = unbiased_cross_entropy(z, torch.tensor([[[0]]]), num_old_classes=2)
    assert old_label.item() == pytest.approx(bg_label.item())


def test_unbiased_cross_entropy_equals_ce_when_no_old_classes_to_fold() -> None:
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    labels = torch.randint(1, 4, (2, 3, 5))
    # with C_old = 1 only background folds, which is plain CE (no ignored pixel: both means agree)
    torch.testing.assert_close(unbiased_cross_entropy(z, labels, 1), F.cross_entropy(z, labels))


def test_unbiased_distillation_hand_computed() -> None:
    new = [[0.2, 1.0, -0.5, 0.7], [2.0, 0.1, 0.3, -1.0]]  # C = 4: bg, old 1, old 2, new 3
    old = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]  # C_old = 3
    expected = []
    for zn, zo in zip(new, old, strict=True):
        den = lse(zn)
        p_old = [math.exp(v - lse(zo)) for v in zo]
        log_bg = lse([zn[0], zn[3]]) - den  # background + every new class
        value = p_old[0] * log_bg + p_old[1] * (zn[1] - den) + p_old[2] * (zn[2] - den)
        expected.append(-value / 3)  # divided by C_old, background included
    loss = unbiased_distillation(pixels(*new), pixels(*old))
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-9)
    masked = unbiased_distillation(pixels(*new), pixels(*old), mask=torch.tensor([[[1.0, 0.0]]]))
    assert masked.item() == pytest.approx(expected[0] / 2, abs=1e-9)  # masked pixels count as zero


def test_knowledge_distillation_hand_computed() -> None:
    new = [[0.2, 1.0, -0.5, 9.0]]  # the new class (index 3) is dropped before the softmax
    old = [[1.0, 0.0, -1.0]]
    den = lse(new[0][:3])
    p_old = [math.exp(v - lse(old[0])) for v in old[0]]
    expected = -sum(p * (z - den) for p, z in zip(p_old, new[0][:3], strict=False)) / 3
    assert knowledge_distillation(pixels(*new), pixels(*old)).item() == pytest.approx(expected, abs=1e-9)


def test_distillation_is_minimal_when_models_agree() -> None:
    old = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    agree = torch.cat([old, torch.full((1, 1, 4, 4), -50.0, dtype=torch.float64)], 1)
    disagree = torch.cat([old.flip(1), torch.full((1, 1, 4, 4), -50.0, dtype=torch.float64)], 1)
    assert unbiased_distillation(agree, old) < unbiased_distillation(disagree, old)
    assert knowledge_distillation(agree, old) < knowledge_distillation(disagree, old)


def test_feature_distillation() -> None:
    a, b = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    assert feature_distillation(a, b).item() == 1.0
