"""PLOP: Local POD pooling by hand, pseudo-labels, the median thresholds and a two-step run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import TINY_OPTIONS, TinySet
from training.methods import build_method
from training.methods.base import Batch, StepContext
from training.methods.plop import (
    LocalPOD,
    PseudoLabelCrossEntropy,
    fold_new_into_background,
    histogram_median,
    local_pod,
    normalized_entropy,
    pod_distance,
    window_bounds,
)
from training.models.bisenet import BiSeNet, BiSeNetConfig
from training.trainer import train_step


def test_window_bounds_cover_odd_and_tiny_sizes() -> None:
    assert window_bounds(3, 2) == [(0, 1), (1, 3)]
    assert window_bounds(5, 4) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert window_bounds(1, 4) == [(0, 1)] * 4  # a 1x1 map (the 1/32 stage of a 32 px crop)


def test_local_pod_on_an_odd_map_by_hand() -> None:
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    expected = [
        *[2, 5, 8, 4, 5, 6],  # scale 1: row means, column means
        *[1, 1],  # scale 2, window rows 0, cols 0: [[1]]
        *[2.5, 2, 3],  # rows 0, cols 1-2: [[2, 3]]
        *[4, 7, 5.5],  # rows 1-2, cols 0: [[4], [7]]
        *[5.5, 8.5, 6.5, 7.5],  # rows 1-2, cols 1-2: [[5, 6], [8, 9]]
    ]
    torch.testing.assert_close(local_pod(x, scales=(1, 2)), torch.tensor([expected]))


def test_pod_distance_is_the_l2_of_squared_descriptors_averaged_over_the_batch() -> None:
    old, new = torch.randn(3, 2, 5, 7), torch.randn(3, 2, 5, 7)
    per_image = [(local_pod(old[i : i + 1] ** 2) - local_pod(new[i : i + 1] ** 2)).norm() for i in range(3)]
    assert pod_distance(old, new).item() == pytest.approx(torch.stack(per_image).mean().item(), rel=1e-5)
    assert pod_distance(old, old).item() == 0.0


def test_new_logits_fold_into_background() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    assert fold_new_into_background(logits, num_old=2).flatten().tolist() == [8.0, 2.0]


def test_histogram_median_interpolates_inside_the_bin() -> None:
    hist = torch.tensor([[0, 2, 2, 0], [4, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(histogram_median(hist), torch.tensor([0.5, 0.125, 0.0]))


def test_normalized_entropy_bounds() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]).view(2, 3, 1, 1)
    torch.testing.assert_close(
        normalized_entropy(probs).flatten(), torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0
    )


def test_pseudo_labels_and_adaptive_factor() -> None:
    term = PseudoLabelCrossEntropy()
    term.thresholds = torch.tensor([0.5, 0.5, 0.01])
    # Old model (3 classes): pixel 0 confident class 1, pixel 1 uncertain, pixel 2 new-class label,
    # pixel 3 confident class 2 but below the 0.01 threshold only if nearly one-hot (it is not).
    old_logits = torch.tensor([[0.0, 10.0, 0.0], [1.0, 1.0, 1.0], [0.0, 10.0, 0.0], [0.0, 0.0, 3.0]])
    old_logits = old_logits.T.reshape(1, 3, 1, 4)
    labels = torch.tensor([[[0, 0, 3, 0]]])
    targets, factor = term.pseudo_labels(labels, old_logits)
    assert targets.tolist() == [[[1, 255, 3, 255]]]
    assert factor.tolist() == pytest.approx([1 / 3])


def test_adaptive_factor_is_one_without_background() -> None:
    term = PseudoLabelCrossEntropy()
    term.thresholds = torch.tensor([0.5, 0.5])
    _, factor = term.pseudo_labels(torch.tensor([[[2, 2]]]), torch.zeros(1, 2, 1, 2))
    assert factor.tolist() == [1.0]


def tiny_models() -> tuple[BiSeNet, BiSeNet]:
    old = BiSeNet(BiSeNetConfig(3, "resnet10", 16, 16), aux=False).eval()
    new = copy.deepcopy(old)
    new.add_classes(2)
    return old, new


def test_thresholds_from_one_pass_are_floored() -> None:
    old, new = tiny_models()
    loader = DataLoader(TinySet([1, 2]), batch_size=2)
    ctx = StepContext(1, new, old, 3, ["bg", "a", "b", "c", "d"], loader, torch.device("cpu"))
    term = PseudoLabelCrossEntropy(min_threshold=0.3)
    term.on_step_start(ctx)
    assert term.thresholds.shape == (3,) and (term.thresholds >= 0.3).all()


def test_local_pod_term_on_an_unchanged_model_only_sees_the_folded_logits() -> None:
    old, new = tiny_models()
    new.eval()
    ctx = StepContext(1, new, old, 3, ["bg", "a", "b", "c", "d"], None, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    out, old_out = new.forward_train(x), old.forward_train(x)
    loss = LocalPOD()(Batch(x, torch.zeros(2, 32, 32, dtype=torch.long), out, old_out), ctx)
    logits_layer = pod_distance(
        old.head.classifier(old_out.features), fold_new_into_background(new.head.classifier(out.features), 3)
    )
    expected = 0.0005 * logits_layer * math.sqrt(5 / 2) / 6  # 4 stages + embedding + logits
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_two_step_plop_run() -> None:
    step0, _ = train_step(None, ["a", "b"], TinySet([1, 2]), None, build_method("plop"), TINY_OPTIONS)
    step1, scores = train_step(
        step0, ["c"], TinySet([3]), TinySet([1, 2, 3], seed=1), build_method("plop"), TINY_OPTIONS
    )
    assert step1.model.num_classes == 4 and scores is not None
    assert [h["method"] for h in step1.history] == ["plop", "plop"]
