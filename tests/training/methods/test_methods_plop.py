"""PLOP: Local POD pooling by hand, pseudo-labels, the median thresholds and a two-step run."""

from __future__ import annotations

import copy
import math
from typing import cast

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import NO_DATA, TINY_OPTIONS, TinySet, stub_model
from training.methods import build_method
from training.methods.base import Batch, StepContext
from training.methods.plop import (
    LocalPOD,
    PseudoLabelCrossEntropy,
    fold_new_into_background,
    local_pod,
    plop_entropy,
    plop_histogram_median,
    pod_distance,
    window_bounds,
)
from training.models.bisenet import BiSeNet, BiSeNetConfig, SegmentationOutput
from training.optim import ParamGroup, resolve_multipliers
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


def reference_find_median(histograms: torch.Tensor) -> torch.Tensor:
    """Transcription of PLOP's find_median loop (arthurdouillard/CVPR2021_PLOP train.py 551-573)."""
    nb_bins = histograms.shape[1]
    thresholds = torch.zeros(histograms.shape[0], dtype=torch.float32)
    for c in range(histograms.shape[0]):
        total = histograms[c].sum()
        if total <= 0.0:
            continue
        half = total / 2
        running_sum = 0.0
        for bin_start in range(nb_bins):
            lower_border = bin_start / nb_bins
            bin_index = int(lower_border * nb_bins)
            if half >= running_sum and half <= (running_sum + histograms[c, bin_index]):
                break
            running_sum += lower_border * nb_bins
        median = lower_border + ((half - running_sum) / histograms[c, bin_index].sum()) * (1 / nb_bins)
        thresholds[c] = median
    return thresholds


def test_plop_histogram_median_by_hand() -> None:
    hist = torch.tensor([[6, 2, 2, 0], [2, 2, 6, 0], [3, 3, 2, 2], [0, 0, 0, 0], [3, 3, 3, 0]])
    expected = [
        0 + 5 / 6 / 4,  # half 5 fits in bin 0 (running 0)
        2 / 4 + (5 - 1) / 6 / 4,  # bins 0 and 1 hold 2 each; before bin 2 the running sum is 0 + 1
        3 / 4 + (5 - 3) / 2 / 4,  # running 0 + 1 + 2 = 3 before bin 3, which holds half - 3
        0.0,  # no pixel
        -math.inf,  # no stop: ends on the empty last bin with running 6 > half 4.5
    ]
    torch.testing.assert_close(plop_histogram_median(hist), torch.tensor(expected))


@pytest.mark.parametrize("seed", range(4))
def test_plop_histogram_median_matches_the_reference_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, 50, (6, 100), generator=gen) * (torch.rand(6, 100, generator=gen) < 0.2)
    hist[0, :3] = torch.tensor([5000, 3000, 2000])  # the shape PLOP's entropies take: the first bins
    hist[1, 99] = 0
    reference = reference_find_median(hist)  # inf, -inf and NaN (0 / 0) included
    torch.testing.assert_close(plop_histogram_median(hist), reference, rtol=1e-5, atol=0, equal_nan=True)


def test_plop_entropy_is_the_references_formula() -> None:
    probs = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.5, 0.3]]).T.reshape(1, 3, 1, 2)
    value = plop_entropy(probs, num_classes=5).flatten()
    # entropy(): -1/log(C_old) * mean_c p log p, then / max_entropy = log(C) (train.py 514, 256, 712-713)
    uniform = -(1 / math.log(3)) * (3 * (1 / 3) * math.log(1 / 3 + 1e-8)) / 3 / math.log(5)
    mixed = -(1 / math.log(3)) * sum(p * math.log(p + 1e-8) for p in (0.2, 0.5, 0.3)) / 3 / math.log(5)
    torch.testing.assert_close(value, torch.tensor([uniform, mixed]))
    assert uniform == pytest.approx(1 / (3 * math.log(5)), rel=1e-6)  # at most 1 / (C_old log C), not 1


def test_pseudo_labels_and_adaptive_factor() -> None:
    term = PseudoLabelCrossEntropy()
    term.thresholds, term.num_classes = torch.tensor([0.1, 0.1, 0.01]), 4
    # Old model (3 classes): pixel 0 confident class 1 (value ~0), pixel 1 uniform (1 / (3 log 4) = 0.24,
    # ignored), pixel 2 new-class label, pixel 3 class 2 at value 0.076 > 0.01 (ignored).
    old_logits = torch.tensor([[0.0, 10.0, 0.0], [1.0, 1.0, 1.0], [0.0, 10.0, 0.0], [0.0, 0.0, 3.0]])
    old_logits = old_logits.T.reshape(1, 3, 1, 4)
    labels = torch.tensor([[[0, 0, 3, 0]]])
    targets, factor = term.pseudo_labels(labels, old_logits)
    assert targets.tolist() == [[[1, 255, 3, 255]]]
    assert factor.tolist() == pytest.approx([1 / (3 + 1e-6)])  # PLOP: num / (den + 1e-6)


def test_adaptive_factor_is_zero_without_background() -> None:
    term = PseudoLabelCrossEntropy()
    term.thresholds, term.num_classes = torch.tensor([0.5, 0.5]), 3
    _, factor = term.pseudo_labels(torch.tensor([[[2, 2]]]), torch.zeros(1, 2, 1, 2))
    assert factor.tolist() == [0.0]  # 0 / (0 + 1e-6), as PLOP


def test_kept_background_fraction_follows_the_reference_rule() -> None:
    """A tiny step through on_step_start: thresholds and the kept fraction as PLOP's code computes them.

    The old model is the identity on "images" that are its logits; 40 background pixels, 16 old
    classes, 17 in all (a 15-1 step). Values fall in bins 0-2, so PLOP's median stops in the first bin
    holding half of a class's pixels, or runs off the end (threshold +inf, every pixel kept).
    """
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, 4, 5, generator=gen) * 3  # (B, C_old, H, W), 40 pixels
    logits[0, 3] += 8.0  # image 0: mostly confident class 3
    labels = torch.zeros(2, 4, 5, dtype=torch.long)
    loader = DataLoader(TensorDataset(logits, labels), batch_size=2)
    model = stub_model(num_classes=17)
    old_model = cast(BiSeNet, torch.nn.Identity())  # the loader's "images" are the old model's logits
    ctx = StepContext(1, model, old_model, 16, [f"c{i}" for i in range(17)], loader, torch.device("cpu"))
    term = PseudoLabelCrossEntropy()
    term.on_step_start(ctx)

    probs = torch.softmax(logits, dim=1)
    values = -(probs * torch.log(probs + 1e-8)).mean(dim=1) / math.log(16) / math.log(17)  # train.py 256
    predicted = probs.argmax(dim=1)
    histograms = torch.zeros(16, 100, dtype=torch.long)
    histograms.index_put_(
        (predicted.flatten(), (values * 100).long().clamp(max=99).flatten()),
        torch.ones(40, dtype=torch.long),
        accumulate=True,
    )  # train.py 539-546
    expected = reference_find_median(histograms).clamp_min(0.001)  # train.py 582-584
    torch.testing.assert_close(term.thresholds, expected)
    targets, _ = term.pseudo_labels(labels, logits)
    kept = (values < expected[predicted]).float().mean()
    assert (targets != 255).float().mean().item() == pytest.approx(kept.item())
    assert kept > 0.5


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
    assert term.thresholds is not None
    assert term.thresholds.shape == (3,) and (term.thresholds >= 0.3).all() and term.num_classes == 5


def test_local_pod_term_on_an_unchanged_model_only_sees_the_folded_logits() -> None:
    old, new = tiny_models()
    new.eval()
    ctx = StepContext(1, new, old, 3, ["bg", "a", "b", "c", "d"], NO_DATA, torch.device("cpu"))
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


def test_plop_keeps_heads_and_old_rows_at_the_steps_rate() -> None:
    method = build_method("plop")
    rates = resolve_multipliers(True, *(term.lr_multipliers for term in method.terms))
    assert rates == {
        ParamGroup.BACKBONE: 1.0,
        ParamGroup.SPATIAL_PATH: 1.0,  # with the heads
        ParamGroup.HEAD: 1.0,
        ParamGroup.CLASSIFIER: 1.0,
        ParamGroup.NEW_CLASSES: 100.0,
    }
    assert resolve_multipliers(False, *(term.lr_multipliers for term in method.terms))[ParamGroup.HEAD] == 1.0


def test_pseudo_label_cross_entropy_scales_each_image_and_sums_the_heads() -> None:
    """PLOP ``train.py`` 256-262 (pseudo-labels), 286-292 (factor per image), 351-352 (all-pixel mean)."""
    term = PseudoLabelCrossEntropy()
    term.thresholds, term.num_classes = torch.tensor([0.1, 0.1, 0.1]), 4
    confident_1, confident_2, uniform = [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [1.0, 1.0, 1.0]
    # Image 0: background confident (-> 1), background uncertain (ignored), new class 3: factor 1/2.
    # Image 1: background confident (-> 2), labelled ignore, background confident (-> 1): factor 2/2.
    old = torch.tensor(
        [[confident_1, uniform, uniform], [confident_2, uniform, confident_1]]
    )  # (B, P, C_old)
    labels = torch.tensor([[[0, 0, 3]], [[0, 255, 0]]])  # (2, 1, 3)
    targets = [[1, None, 3], [2, None, 1]]
    factors = [1 / (2 + 1e-6), 2 / (2 + 1e-6)]
    generator = torch.Generator().manual_seed(0)
    main, aux = (torch.randn(2, 4, 1, 3, generator=generator) for _ in range(2))
    batch = Batch(
        torch.zeros(2, 3, 1, 3),
        labels,
        SegmentationOutput(main, torch.zeros(2, 1, 1, 3), [], [aux]),
        SegmentationOutput(old.permute(0, 2, 1).reshape(2, 3, 1, 3), torch.zeros(2, 1, 1, 3), []),
    )
    ctx = StepContext(1, stub_model(), stub_model(), 3, ["bg", "a", "b", "c"], NO_DATA, torch.device("cpu"))

    def reference(logits: torch.Tensor) -> float:
        total = 0.0
        for b in range(2):
            for p in range(3):
                target = targets[b][p]
                if target is not None:
                    z = logits[b, :, 0, p].tolist()
                    ce = math.log(sum(math.exp(v) for v in z)) - z[target]
                    total += factors[b] * ce
        return total / 6  # all B * H * W pixels, the ignored ones counting 0

    assert term(batch, ctx).item() == pytest.approx(reference(main) + reference(aux), rel=1e-5)
