"""WILSON's weak term: each loss piece against the formula of fcdl94/WILSON on a tiny tensor, the
pseudo-label assembly on a tiny case, and the localizer learning to find an object from image labels."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.data.dataset import WeakItem
from training.methods import build_method
from training.methods import weak as weak_module
from training.methods.base import Batch, StepContext
from training.methods.weak import (
    Localizer,
    WeakLabels,
    assemble_target,
    balanced_mask_loss_ce,
    binarize,
    hard_labels,
    image_label_loss,
    ngwp_focal,
    old_probabilities,
    pamr,
    pseudo_gtmask,
    segmentation_loss,
    with_weak_labels,
)
from training.models.bisenet import BiSeNet, BiSeNetConfig


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_ngwp_focal_is_wilsons_pooling_plus_focal_penalty() -> None:
    # W wss_loss.py:5-20: y_c = sum_p z m / (1 + sum_p m) + (1 - mean m)^3 log(0.01 + mean m)
    maps = torch.tensor([[[[1.0, -2.0]], [[0.5, 3.0]], [[-1.0, 0.0]]]])  # (1, 3, 1, 2)
    pixels = [[1.0, 0.5, -1.0], [-2.0, 3.0, 0.0]]  # per pixel, per class
    m = [_softmax(p) for p in pixels]
    expected = []
    for c in range(3):
        pooled = sum(pixels[p][c] * m[p][c] for p in range(2)) / (1 + sum(m[p][c] for p in range(2)))
        mean = sum(m[p][c] for p in range(2)) / 2
        expected.append(pooled + (1 - mean) ** 3 * math.log(0.01 + mean))
    assert ngwp_focal(maps)[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_image_label_loss_scores_the_last_channels_against_the_labels() -> None:
    # W wss_loss.py:34-51 (mode ngwp, reduction mean): y[:, -n:] against the labels, BCE mean
    maps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = ngwp_focal(maps)[:, 2:]
    expected = sum(_bce(float(scores[b, c]), float(labels[b, c])) for b in range(2) for c in range(2)) / 4
    assert image_label_loss(maps, labels).item() == pytest.approx(expected, abs=1e-6)


def test_binarize_keeps_every_maximum() -> None:
    maps = torch.tensor([[[[0.2]], [[0.5]], [[0.5]]]])
    assert binarize(maps).flatten().tolist() == [0.0, 1.0, 1.0]


def test_pseudo_gtmask_thresholds_each_class_at_its_peak_and_drops_ambiguous_pixels() -> None:
    # W single_stage.py:18-40 with train.py:257 cutoffs: bkg 0.7 x peak, others 0.6 x peak, floor 0.2
    bg = [0.9, 0.7, 0.1, 0.1]  # peak 0.9 -> threshold 0.63: pixels 0, 1
    c1 = [0.05, 0.5, 0.8, 0.3]  # peak 0.8 -> 0.48: pixels 1, 2 (1 also bg: ambiguous)
    c2 = [0.05, 0.1, 0.15, 0.3]  # peak 0.3 -> 0.18, floor 0.2: pixel 3
    maps = torch.tensor([bg, c1, c2]).reshape(1, 3, 1, 4)
    out = pseudo_gtmask(maps).reshape(3, 4).tolist()
    assert out == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_balanced_mask_loss_ce_weights_pixels_by_the_other_classes_share() -> None:
    # W single_stage.py:43-79
    maps = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, -1.0]], [[0.5, 0.5, 0.5]]]])  # (1, 3, 1, 3)
    pseudo = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]]])  # pixel 2: none
    labels = torch.tensor([[1.0, 0.0]])  # class 1 shown: 1 + background = 2 classes, as in the pseudo-mask
    total = 2
    weights = [(total - 1) / (1 + total), (total - 1) / (1 + total), 0.0]
    ce = [-math.log(_softmax([2.0, 0.0, 0.5])[0]), -math.log(_softmax([0.0, 1.0, 0.5])[1]), 0.0]
    expected = sum(w * c for w, c in zip(weights, ce, strict=True)) / 3
    assert balanced_mask_loss_ce(maps, pseudo, labels).item() == pytest.approx(expected, abs=1e-6)
    # an image whose pseudo-mask lacks a labelled class weighs 0
    assert balanced_mask_loss_ce(maps, pseudo, torch.tensor([[1.0, 1.0]])).item() == 0.0


def test_old_probabilities_of_softmax_and_sigmoid_models() -> None:
    logits = torch.tensor([[[[0.0]], [[2.0]], [[-1.0]]]])
    assert old_probabilities(logits, False).flatten().tolist() == pytest.approx(_softmax([0.0, 2.0, -1.0]))
    sig = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    expected = [1 - max(sig), *sig]
    assert old_probabilities(logits, True).flatten().tolist() == pytest.approx(expected)


def test_assemble_target_is_wilsons_mix_of_old_model_and_localizer() -> None:
    # W train.py:252-275, alpha 0.5: classes [bg, old 1, new 2, new 3]; the image shows class 2 only
    probabilities = torch.tensor([0.3, 0.1, 0.4, 0.2]).reshape(1, 4, 1, 1)
    old = torch.tensor([0.6, 0.4]).reshape(1, 2, 1, 1)
    labels = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    built = assemble_target(probabilities, labels, old, alpha=0.5, num_old=2)
    masked = [0.3, 0.0, 0.4, 0.0]  # old 1 and absent 3 zeroed (W 254)
    mixed = [0.5 * (v == 0.4) + 0.5 * v for v in masked]  # hard argmax (class 2) mixed with the soft map
    assert built.masked.flatten().tolist() == pytest.approx(masked)
    assert built.target.flatten().tolist() == pytest.approx([min(0.6, mixed[0]), 0.4, mixed[2], 0.0])
    assert built.image_weight.tolist() == [1.0]
    # the localizer does not see labelled class 3 at all (its channel is 0 after masking) -> weight 0
    both = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    silent = torch.tensor([0.3, 0.1, 0.6, 0.0]).reshape(1, 4, 1, 1)
    assert assemble_target(silent, both, old, 0.5, 2).image_weight.tolist() == [0.0]


def test_old_wins_leaves_no_new_class_where_the_old_model_sees_an_old_one() -> None:
    # pixel 0: the old model says background; pixel 1: old class 1 -> the new class's mix is zeroed there
    probabilities = torch.tensor([[0.2, 0.2], [0.1, 0.1], [0.7, 0.7]]).reshape(1, 3, 1, 2)
    old = torch.tensor([[0.8, 0.3], [0.2, 0.7]]).reshape(1, 2, 1, 2)
    labels = torch.tensor([[0.0, 0.0, 1.0]])
    wilson = assemble_target(probabilities, labels, old, 0.5, 2).target
    ours = assemble_target(probabilities, labels, old, 0.5, 2, old_wins=True).target
    assert wilson[0, 2, 0].tolist() == pytest.approx([0.85, 0.85])
    assert ours[0, 2, 0].tolist() == pytest.approx([0.85, 0.0])
    assert torch.equal(ours[:, :2], wilson[:, :2])


def test_cutoff_moves_a_new_class_below_its_share_of_the_peak_to_background() -> None:
    # classes [bg, old 1, new 2]; class 2's map over 3 pixels: 0.8 (peak), 0.6, 0.3; cutoff 0.7 -> 0.56
    probabilities = torch.tensor([[0.2, 0.4, 0.7], [0.0, 0.0, 0.0], [0.8, 0.6, 0.3]]).reshape(1, 3, 1, 3)
    old = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).reshape(1, 2, 1, 3)
    labels = torch.tensor([[0.0, 0.0, 1.0]])
    built = assemble_target(probabilities, labels, old, 0.5, 2, cutoff=0.7)
    assert built.masked[0, 2, 0].tolist() == pytest.approx([0.8, 0.6, 0.0])
    assert built.masked[0, 0, 0].tolist() == pytest.approx([0.2, 0.4, 1.0])  # the mass moved to background
    assert torch.equal(assemble_target(probabilities, labels, old, 0.5, 2, cutoff=0.0).masked, probabilities)


def test_segmentation_loss_for_sigmoid_and_softmax_models() -> None:
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, -1.0]], [[-0.5, 2.0]]]])  # (1, 3, 1, 2)
    target = torch.tensor([[[[0.2, 0.6]], [[0.5, 0.0]], [[0.3, 0.4]]]])
    weight = torch.tensor([1.0])
    # sigmoid: W train.py:280-282, BCE summed over classes 1.. (channel 0 is the constant threshold)
    per_pixel = [
        sum(_bce(float(logits[0, c, 0, p]), float(target[0, c, 0, p])) for c in (1, 2)) for p in (0, 1)
    ]
    expected = sum(per_pixel) / 2 / (1 + 1e-5)
    assert segmentation_loss(logits, target, weight, True).item() == pytest.approx(expected, rel=1e-5)
    # softmax: cross-entropy against the target normalised per pixel
    ce = []
    for p in (0, 1):
        t = [float(target[0, c, 0, p]) for c in range(3)]
        q = _softmax([float(logits[0, c, 0, p]) for c in range(3)])
        ce.append(-sum(ti / sum(t) * math.log(qi) for ti, qi in zip(t, q, strict=True)))
    assert segmentation_loss(logits, target, weight, False).item() == pytest.approx(sum(ce) / 2 / (1 + 1e-5))
    assert segmentation_loss(logits, target, torch.tensor([0.0]), False).item() == 0.0


def test_hard_labels_make_old_classes_background() -> None:
    # classes [bg, old 1, new 2]; pixels: background, old class confident, new class
    target = torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7]]).T.reshape(1, 3, 1, 3)
    assert hard_labels(target, 2, (1, 3)).tolist() == [[[0, 0, 2]]]


def _tiny(num_classes: int, sigmoid: bool = False) -> BiSeNet:
    config = BiSeNetConfig(num_classes, "resnet10", 16, 16, sigmoid_outputs=sigmoid)
    return BiSeNet(config, aux=False)


def _context(model: BiSeNet, old: BiSeNet, iteration: int, total: int) -> StepContext:
    ctx = StepContext(1, model, old, old.num_classes, ["bg", "a", "b", "c"], [], torch.device("cpu"))
    ctx.iteration, ctx.total_iterations = iteration, total
    return ctx


WILSON_OPTIONS = {"pseudo_start": 0.125, "warmup_iterations": 0, "refine_iterations": 0, "cutoff": 0.0}
OPTION_SETS = [WILSON_OPTIONS, {}, {"refine_iterations": 2, "pseudo_start": 0.125}]


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("sigmoid", [False, True])
def test_pseudo_label_assembly_on_a_tiny_case(sigmoid: bool, options: dict) -> None:
    """Weak images: 255 before pseudo_start, then background, new classes they show, never an old class
    nor a new class they do not show; images with a mask keep it (WILSON's term and its options)."""
    torch.manual_seed(0)
    old, model = _tiny(2, sigmoid).eval(), _tiny(4, sigmoid).eval()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.full((2, 32, 32), 255, dtype=torch.long)
    masks[1, :16] = 3  # image 1 has a mask
    image_labels = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # image 0 shows class 2
    weak = torch.tensor([True, False])
    term = WeakLabels(**options)
    with torch.no_grad():
        batch = Batch(
            images, masks, model.forward_train(images), old.forward_train(images), image_labels, weak
        )
        ctx = _context(model, old, 0, 100)
        term.on_step_start(ctx)
        early = term.prepare(batch, ctx)
        if term.pseudo_start > 0:
            assert (early.labels == masks).all()  # 12.5 % of 100 iterations not reached
        ctx.iteration = 13
        late = term.prepare(batch, ctx)
    assert (late.labels[1] == masks[1]).all()
    assert set(late.labels[0].unique().tolist()) <= {0, 2} and (late.labels[0] == 2).any()
    loss = term(late, ctx)
    assert torch.isfinite(loss) and loss > 0


def test_weak_step_needs_an_old_model_and_image_labels() -> None:
    model = _tiny(3)
    term = WeakLabels()
    with pytest.raises(ValueError, match="step 0 needs masks"):
        term.on_step_start(StepContext(0, model, None, 0, ["bg", "a", "b"], [], torch.device("cpu")))
    images = torch.randn(2, 3, 32, 32)
    plain = Batch(images, torch.zeros(2, 32, 32, dtype=torch.long), model.forward_train(images), None)
    with pytest.raises(ValueError, match="image-level labels"):
        term.prepare(plain, _context(_tiny(4), model, 0, 10))
    with pytest.raises(ValueError, match="every class at once"):
        with_weak_labels(build_method("joint"))
    weak = with_weak_labels(build_method("mib"))
    assert isinstance(weak.terms[0], WeakLabels) and weak.needs_image_labels and weak.name == "mib"
    # WILSON's loss_de 1 (run.sh): the encoder MSE, once, even for a method that has it (ILT)
    assert [t.name for t in weak.terms] == ["wilson", "unbiased_ce", "unbiased_kd", "feature_kd"]
    assert [t.name for t in with_weak_labels(build_method("ilt")).terms].count("feature_kd") == 1
    assert "feature_kd" not in [t.name for t in with_weak_labels(build_method("mib"), encoder_kd=0).terms]


def _toy_images(
    n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """16 x 16 grey images, each with one 5 x 5 square: red (class 1) or blue (class 2), at a random place."""
    images = torch.full((n, 3, 16, 16), 0.5)
    labels = torch.zeros(n, 3)
    corners = []
    for i in range(n):
        cls = 1 + int(torch.randint(2, (1,), generator=generator))
        y, x = (int(v) for v in torch.randint(0, 12, (2,), generator=generator))
        colour = torch.tensor([1.0, 0.0, 0.0] if cls == 1 else [0.0, 0.0, 1.0])
        images[i, :, y : y + 5, x : x + 5] = colour[:, None, None]
        labels[i, cls] = 1.0
        corners.append((y, x))
    return images, labels, corners


def test_localizer_map_peaks_on_the_object_after_training_on_image_labels() -> None:
    """A few hundred iterations of WILSON's image-label loss on a toy set: the map of the class an image
    shows peaks inside its object, on a hand-made image the training never saw."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    localizer = Localizer(8, 3)
    optimizer = torch.optim.Adam([*encoder.parameters(), *localizer.parameters()], lr=0.01)
    for _ in range(300):
        images, labels, _ = _toy_images(16, generator)
        loss = image_label_loss(localizer(encoder(images)), labels[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    localizer.eval()
    image = torch.full((1, 3, 16, 16), 0.5)
    image[0, 0, 9:14, 2:7], image[0, 1:, 9:14, 2:7] = (
        1.0,
        0.0,
    )  # a red square (class 1) at rows 9-13, cols 2-6
    with torch.no_grad():
        maps = F.softmax(localizer(encoder(image)), dim=1)[0, 1]  # (16, 16) class 1
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centre = (float((maps * rows).sum() / maps.sum()), float((maps * cols).sum() / maps.sum()))
    assert 9 <= centre[0] <= 13 and 2 <= centre[1] <= 6  # the map's mass is centred on the object
    assert maps[9:14, 2:7].min() > 0.9  # covers it
    far = torch.ones(16, 16, dtype=torch.bool)
    far[6:17, 0:10] = False  # more than 3 px from the object (the convolutions' reach blurs its edge)
    assert maps[far].max() < 0.1


def _wilson_pamr(
    image: torch.Tensor, masks: torch.Tensor, iterations: int, dilations: list[int]
) -> torch.Tensor:
    """W wss/modules.py:15-150 as its formula: 3x3 difference and copy kernels at each dilation
    (replicate padding), the deviation over the 9 taps of every dilation, softmax over the 8 x D taps."""
    masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    taps = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    copy = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate(taps):
        copy[i, 0, r, c] = 1
    difference = -copy.clone()
    difference[:, 0, 1, 1] = 1
    every = torch.eye(9).reshape(9, 1, 3, 3)

    def local(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        b, k, h, w = x.shape
        flat = x.reshape(b * k, 1, h, w)
        out = [F.conv2d(F.pad(flat, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(out, 1).reshape(b, k, -1, h, w)

    spread = local(image, every).std(2, keepdim=True)
    weights = (-local(image, difference).abs() / (1e-8 + 0.1 * spread)).mean(1, keepdim=True).softmax(2)
    for _ in range(iterations):
        masks = (local(masks, copy) * weights).sum(2)
    return masks


def test_pamr_is_wilsons_affinity_propagation() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 9, 11, generator=generator)
    masks = torch.rand(2, 4, 3, 4, generator=generator).softmax(1)
    expected = _wilson_pamr(image, masks, 10, [1, 2, 4, 8, 12])
    refined = pamr(image, masks)
    assert refined.shape == (2, 4, 9, 11)
    assert torch.allclose(refined, expected, atol=1e-5)
    assert torch.allclose(pamr(image, masks, 3, (1, 3)), _wilson_pamr(image, masks, 3, [1, 3]), atol=1e-5)


def test_pamr_pulls_a_coarse_map_to_the_object_edges() -> None:
    """A 12 x 12 square on a 24 x 24 image, its map at 1/8: the refined map's argmax matches the square
    better than the bilinear upsampling of the same map."""
    image = torch.zeros(1, 3, 24, 24)
    image[:, :, 6:18, 6:18] = 1.0
    image += 0.01 * torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    coarse = torch.zeros(1, 2, 3, 3)
    coarse[0, 1, 1, 1] = 1.0
    coarse[0, 0] = 1 - coarse[0, 1]
    truth = torch.zeros(24, 24, dtype=torch.bool)
    truth[6:18, 6:18] = True

    def iou(masks: torch.Tensor) -> float:
        found = masks[0].argmax(0) == 1
        return float((found & truth).sum() / (found | truth).sum())

    bilinear = F.interpolate(coarse, size=(24, 24), mode="bilinear", align_corners=True)
    assert iou(pamr(image, coarse)) > iou(bilinear) + 0.1
    assert torch.allclose(
        pamr(image, coarse).sum(1), torch.ones(1, 24, 24), atol=1e-5
    )  # still a distribution


def _weak_batches(n_batches: int, generator: torch.Generator) -> list[WeakItem]:
    batches = []
    for _ in range(n_batches):
        images, labels, _ = _toy_images(4, generator)
        step_labels = torch.cat([torch.zeros(4, 1), labels[:, 1:]], 1)  # old: bg + 0 classes; new: 1, 2
        batches.append(
            WeakItem(images, torch.full((4, 16, 16), 255), step_labels, torch.ones(4, dtype=torch.bool))
        )
    return batches


def test_warm_up_trains_the_localizer_alone_on_the_old_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    old, model = _tiny(1).eval(), _tiny(3)
    batches = _weak_batches(3, torch.Generator().manual_seed(0))
    term = WeakLabels(warmup_iterations=60)
    ctx = StepContext(1, model, old, 1, ["bg", "a", "b"], [], torch.device("cpu"))
    ctx.weak_batches = batches
    before = [p.clone() for p in old.parameters()]
    term.on_step_start(ctx)  # builds the localizer, then warms it up
    assert all(
        torch.equal(a, b) for a, b in zip(before, old.parameters(), strict=True)
    )  # old model untouched
    losses = term.warm_up(batches, old, 1, torch.device("cpu"))  # 60 more
    assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10])

    read = []

    def counted() -> Iterator[WeakItem]:
        for item in batches:
            read.append(item)
            yield item

    monkeypatch.setattr(weak_module, "WARMUP_CACHE_BYTES", 1)  # the first batch already fills the cache
    assert len(term.warm_up(counted(), old, 1, torch.device("cpu"))) == 60  # cycles through what it kept
    assert len(read) == 1


def test_a_step_without_warm_up_leaves_the_localizer_as_built() -> None:
    torch.manual_seed(0)
    old, model = _tiny(1).eval(), _tiny(3)
    ctx = StepContext(1, model, old, 1, ["bg", "a", "b"], [], torch.device("cpu"))
    ctx.weak_batches = _weak_batches(1, torch.Generator().manual_seed(0))
    term = WeakLabels(warmup_iterations=0)
    torch.manual_seed(1)
    term.on_step_start(ctx)
    torch.manual_seed(1)
    fresh = Localizer(model.embed_dim, 3)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.parameters(), term.require_localizer().parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="warmup_iterations"):
        WeakLabels(warmup_iterations=-1)
    with pytest.raises(ValueError, match="cutoff"):
        WeakLabels(cutoff=1.0)
