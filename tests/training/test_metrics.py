from __future__ import annotations

import math

import pytest
import torch

from training.metrics import ConfusionMatrix, SegmentationScores


def test_confusion_matrix_and_iou_on_known_case() -> None:
    labels = torch.tensor([[0, 0, 1, 1, 2, 255]])
    preds = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm = ConfusionMatrix(4)
    cm.update(preds, labels)
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 3)  # tp 1, fp 1 (from class 2), fn 1
    assert iou[1] == pytest.approx(2 / 3)
    assert iou[2] == 0.0
    assert math.isnan(iou[3])  # absent and never predicted: not counted
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_scores_group_old_and_new() -> None:
    cm = ConfusionMatrix(4)
    cm.matrix = torch.tensor([[8, 2, 0, 0], [0, 10, 0, 0], [0, 0, 5, 5], [0, 0, 0, 10]])
    scores = SegmentationScores.from_confusion(cm, ["bg", "a", "b", "c"], num_old=2)
    assert scores.miou_old == pytest.approx((0.8 + 10 / 12) / 2)
    assert scores.miou_new == pytest.approx((0.5 + 10 / 15) / 2)
    assert scores.miou_all == pytest.approx((0.8 + 10 / 12 + 0.5 + 10 / 15) / 4)
    assert scores.per_class_iou["b"] == pytest.approx(0.5)
    assert scores.miou_old is not None and scores.miou_new is not None
    assert scores.hiou == pytest.approx(
        2 * scores.miou_old * scores.miou_new / (scores.miou_old + scores.miou_new)
    )


def test_scores_without_new_classes() -> None:
    cm = ConfusionMatrix(2)
    cm.matrix = torch.tensor([[3, 1], [0, 4]])
    scores = SegmentationScores.from_confusion(cm, ["bg", "a"], num_old=2)
    assert scores.miou_new is None and scores.hiou is None


def test_label_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(2).update(torch.tensor([[0]]), torch.tensor([[5]]))
