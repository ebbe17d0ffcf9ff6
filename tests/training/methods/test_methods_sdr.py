"""SDR terms: hand-checked losses on the backbone output, exact running prototypes, a two-step run."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import TINY_OPTIONS, TinySet, stub_model
from training.methods import build_method
from training.methods.base import Batch, StepContext
from training.methods.sdr import (
    PROTOTYPES,
    FeatureAttraction,
    FeatureRepulsion,
    FeatureSparsity,
    PrototypeBank,
    PrototypeMatching,
    downsample_labels,
    sdr,
)
from training.models.bisenet import BiSeNet, BiSeNetConfig, SegmentationOutput
from training.trainer import train_step


def make_ctx(
    step: int, num_classes: int, num_old: int, dim: int = 2, loader: DataLoader | None = None
) -> StepContext:
    """A context with a real tiny BiSeNet when a loader is given, else a stub with only the sizes."""
    if loader is None:
        model = stub_model(body_channels=dim, num_classes=num_classes)
        loader = DataLoader(TinySet([1]), batch_size=2)
    else:
        model = BiSeNet(BiSeNetConfig(num_classes, "resnet10", 16, dim), aux=False)
    classes = [f"c{i}" for i in range(num_classes)]
    return StepContext(
        step, model, model if num_old else None, num_old, classes, loader, torch.device("cpu"), {}
    )


def make_batch(features: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor | None = None) -> Batch:
    """A batch whose backbone output is ``features`` and whose labels already have its size.

    The embedding (``out.features``) is set to something else: SDR must not read it.
    """
    logits = torch.zeros(features.shape[0], 1, *features.shape[2:])
    embedding = torch.full((features.shape[0], 5, *features.shape[2:]), 100.0)
    old = SegmentationOutput(old_logits, embedding, [features]) if old_logits is not None else None
    return Batch(
        torch.zeros(features.shape[0], 3, *features.shape[2:]),
        labels,
        SegmentationOutput(logits, embedding, [features]),
        old,
    )


def quadrant_set(classes: list[int], n: int = 4, seed: int = 0) -> TensorDataset:
    """64x64 images whose top-right and bottom-left quadrants show ``classes`` (the rest background).

    At the backbone's 1/32 (2x2) every quadrant is one cell, so each class reaches the body features.
    """
    labels = torch.zeros(n, 64, 64, dtype=torch.long)
    quadrants = [(slice(0, 32), slice(32, 64)), (slice(32, 64), slice(0, 32))]
    for (rows, cols), c in zip(quadrants[: len(classes)], classes, strict=True):
        labels[:, rows, cols] = c
    images = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) + labels[:, None]
    return TensorDataset(images, labels)


def set_prototypes(ctx: StepContext, protos: torch.Tensor, counts: list[int]) -> None:
    ctx.state[PROTOTYPES] = {"prototypes": protos.clone(), "counts": torch.tensor(counts)}


def test_downsample_labels_is_nearest() -> None:
    labels = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 255, 255], [3, 3, 255, 255]]])
    assert downsample_labels(labels, (2, 2)).tolist() == [[[1, 2], [3, 255]]]


def test_running_mean_is_exact_and_updates_only_the_steps_classes() -> None:
    ctx = make_ctx(step=1, num_classes=4, num_old=2, dim=3)
    bank = PrototypeBank()
    set_prototypes(ctx, torch.tensor([[1.0, 1, 1], [2, 2, 2]]), [5, 7])
    bank.start(ctx)  # grows to 4 classes
    assert ctx.state[PROTOTYPES]["prototypes"].shape == (4, 3)
    gen = torch.Generator().manual_seed(0)
    seen: dict[int, list[torch.Tensor]] = {2: [], 3: []}
    for _ in range(3):
        features = torch.randn(2, 3, 4, 4, generator=gen)
        labels = torch.randint(0, 4, (2, 4, 4), generator=gen)
        labels[0, 0] = 255
        batch = make_batch(features, labels)
        bank.observe(batch, ctx)
        bank.observe(batch, ctx)  # a second term on the same batch does not count it twice
        flat = features.permute(0, 2, 3, 1).reshape(-1, 3)
        for c in seen:
            seen[c].append(flat[labels.reshape(-1) == c])
    protos, counts = ctx.state[PROTOTYPES]["prototypes"], ctx.state[PROTOTYPES]["counts"]
    for c, parts in seen.items():
        everything = torch.cat(parts)
        assert counts[c] == everything.shape[0]
        torch.testing.assert_close(protos[c], everything.mean(dim=0))
    torch.testing.assert_close(protos[:2], torch.tensor([[1.0, 1, 1], [2, 2, 2]]))  # old ones frozen
    assert counts[:2].tolist() == [5, 7]


def test_background_prototype_is_learned_at_step_zero() -> None:
    ctx = make_ctx(step=0, num_classes=2, num_old=0, dim=2)
    bank = PrototypeBank()
    bank.start(ctx)
    features = torch.tensor([[[[1.0, 3.0]], [[2.0, 4.0]]]])  # (1, 2, 1, 2)
    bank.observe(make_batch(features, torch.tensor([[[0, 1]]])), ctx)
    torch.testing.assert_close(ctx.state[PROTOTYPES]["prototypes"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_prototype_matching_hand_computed() -> None:
    # Old classes 0, 1, 2; new class 3. Pixels: bg predicted 1, bg predicted 2, bg predicted 0, new class.
    ctx = make_ctx(step=1, num_classes=4, num_old=3)
    set_prototypes(ctx, torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]), [1, 1, 1, 0])
    features = torch.tensor([[[[3.0, 0.0, 5.0, 7.0]], [[1.0, 4.0, 5.0, 7.0]]]])  # (1, 2, 1, 4)
    labels = torch.tensor([[[0, 0, 0, 3]]])
    old_logits = torch.zeros(1, 3, 1, 4)
    old_logits[0, 1, 0, 0] = old_logits[0, 2, 0, 1] = old_logits[0, 0, 0, 2] = old_logits[0, 1, 0, 3] = 5.0
    term = PrototypeMatching(1.0, PrototypeBank())
    loss = term(make_batch(features, labels, old_logits), ctx)
    expected = (((3 - 1) ** 2 + (1 - 0) ** 2) / 2 + ((0 - 0) ** 2 + (4 - 2) ** 2) / 2) / 2
    assert loss.item() == pytest.approx(expected)


def test_attraction_divides_once_by_the_number_of_classes() -> None:
    ctx = make_ctx(step=1, num_classes=3, num_old=2)
    set_prototypes(ctx, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]), [1, 1, 0])
    features = torch.tensor([[[[1.0, 3.0, 2.0, 4.0]], [[0.0, 1.0, 2.0, 2.0]]]])
    labels = torch.tensor([[[0, 1, 2, 2]]])
    loss = FeatureAttraction(1.0, PrototypeBank())(make_batch(features, labels), ctx)
    bg = (1**2 + 0**2) / 2
    cls1 = ((3 - 1) ** 2 + (1 - 1) ** 2) / 2
    cls2 = ((2 - 3) ** 2 + (2 - 2) ** 2 + (4 - 3) ** 2 + (2 - 2) ** 2) / 4  # prototype = batch mean (3, 2)
    assert loss.item() == pytest.approx((bg + cls1 + cls2) / 3)


def test_repulsion_is_the_mean_inverse_distance_between_class_means() -> None:
    ctx = make_ctx(step=1, num_classes=3, num_old=2)
    set_prototypes(ctx, torch.zeros(3, 2), [0, 0, 0])
    features = torch.tensor(
        [[[[0.0, 2.0, 4.0, 6.0, 9.0]], [[0.0, 4.0, 4.0, 8.0, 9.0]]]]
    )  # means (0,0) (3,4) (6,8)
    labels = torch.tensor([[[0, 1, 1, 2, 255]]])
    loss = FeatureRepulsion(1.0, PrototypeBank())(make_batch(features, labels), ctx)
    assert loss.item() == pytest.approx((1 / 5 + 1 / 10 + 1 / 5) / 3)


def test_repulsion_needs_two_classes() -> None:
    ctx = make_ctx(step=1, num_classes=3, num_old=2)
    set_prototypes(ctx, torch.zeros(3, 2), [0, 0, 0])
    loss = FeatureRepulsion(1.0, PrototypeBank())(
        make_batch(torch.ones(1, 2, 1, 2), torch.tensor([[[1, 1]]])), ctx
    )
    assert loss.item() == 0.0


def test_sparsity_hand_computed_and_guarded() -> None:
    ctx = make_ctx(step=0, num_classes=3, num_old=0)
    PrototypeBank().start(ctx)
    # Pixels: (1, 2) in class 1, (0.5, 0) in class 2, (0, 0) in class 1 (no activation: left out).
    features = torch.tensor([[[[1.0, 0.5, 0.0]], [[2.0, 0.0, 0.0]]]], requires_grad=True)
    labels = torch.tensor([[[1, 2, 1]]])
    loss = FeatureSparsity(1.0, PrototypeBank())(make_batch(features, labels), ctx)
    first = (math.exp(0.5) + math.exp(1.0)) / 1.5  # normalised by the class-1 max, 2
    second = (math.exp(1.0) + math.exp(0.0)) / 1.0  # normalised by the class-2 max, 0.5
    assert loss.item() == pytest.approx((first + second) / 2)
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def test_on_step_end_fills_prototypes_without_training() -> None:
    """A step trained without SDR (e.g. a shared step-0 model): the hook alone computes them."""
    loader = DataLoader(quadrant_set([1, 2]), batch_size=2)
    ctx = make_ctx(step=0, num_classes=3, num_old=0, dim=16, loader=loader)
    build_method("mib+sdr").on_step_end(ctx)
    protos, counts = ctx.state[PROTOTYPES]["prototypes"], ctx.state[PROTOTYPES]["counts"]
    ctx.model.eval()
    with torch.no_grad():  # the backbone's output (resnet10: 512 channels at 1/32), not the embedding
        features = torch.cat([ctx.model.forward_train(x).stages[-1] for x, _ in loader])
    assert features.shape[1] == ctx.model.body_channels == 512 and protos.shape == (3, 512)
    labels = torch.cat([downsample_labels(y, features.shape[2:]) for _, y in loader])
    flat = features.permute(0, 2, 3, 1).reshape(-1, 512)
    for c in range(3):
        chosen = flat[labels.reshape(-1) == c]
        assert counts[c] == chosen.shape[0] > 0
        torch.testing.assert_close(protos[c], chosen.mean(dim=0))


def test_sdr_alone_has_no_classifier() -> None:
    with pytest.raises(ValueError, match="classification"):
        build_method("sdr")


def test_sdr_weights_are_those_of_its_method_preset() -> None:
    """LTTM/SDR argparser.py 53-63: loss_kd 100 (unbiased), prototypes 1e-2, fc 1e-3, sep 1e-3, fs 1e-3."""
    weights = {t.name: t.weight for t in build_method("mib(kd=100)+sdr").terms}
    assert weights == {
        "unbiased_ce": 1.0,
        "unbiased_kd": 100.0,
        "sdr_matching": 1e-2,
        "sdr_attraction": 1e-3,
        "sdr_repulsion": 1e-3,
        "sdr_sparsity": 1e-3,
    }
    switched_at_step_one = {t.name for t in sdr().terms if t.needs_old_model}
    assert switched_at_step_one == {"sdr_matching", "sdr_attraction", "sdr_repulsion"}


def test_stored_prototypes_of_another_width_are_refused() -> None:
    ctx = make_ctx(step=1, num_classes=3, num_old=2, dim=512)
    set_prototypes(ctx, torch.zeros(2, 128), [1, 1])  # an embedding-width bank from before
    with pytest.raises(ValueError, match="backbone outputs 512"):
        PrototypeBank().start(ctx)


def test_two_step_mib_sdr_run_keeps_and_grows_prototypes() -> None:
    options = TINY_OPTIONS.model_copy(update={"size": 64})
    step0, _ = train_step(None, ["a", "b"], quadrant_set([1, 2]), None, build_method("mib+sdr"), options)
    protos0 = step0.state[PROTOTYPES]
    assert protos0["prototypes"].shape == (3, 512) and (protos0["counts"] > 0).all()
    step1, scores = train_step(
        step0,
        ["c"],
        quadrant_set([3]),
        quadrant_set([1, 3], seed=1),
        build_method("mib(kd=100)+sdr"),
        options,
    )
    protos1 = step1.state[PROTOTYPES]
    assert step1.model.num_classes == 4 and scores is not None
    assert protos1["prototypes"].shape == (4, 512) and protos1["counts"][3] > 0
    torch.testing.assert_close(protos1["prototypes"][:3], protos0["prototypes"])
    assert torch.equal(protos1["counts"][:3], protos0["counts"])
