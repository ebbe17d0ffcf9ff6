"""ALIFE: ALI and its gradient, Cayley rotations, the feature memory, classifier fine-tuning, a run."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tests.helpers import NO_DATA, TINY_OPTIONS, TinySet, stub_model
from training.methods.alife import (
    FEATURE_MEMORY,
    ROTATIONS,
    AdaptiveLogitRegularizer,
    CayleyRotation,
    FeatureMemory,
    ForegroundDistillation,
    NewClassCrossEntropy,
    ReplayOptions,
    StepWeights,
    adaptive_logit_regularizer,
    alife,
    extract_memory,
    finetune_classifier,
    finetune_loss,
    focal_loss,
    reference_weights,
    rotate_memory,
    soft_class_assignment,
)
from training.methods.base import Batch, StepContext
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig, SegmentationOutput
from training.optim import ParamGroup, resolve_multipliers
from training.trainer import train_step

REPLAY: dict[str, Any] = {"memory_size": 8, "rotation_epochs": 2}


def logits_batch(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor) -> Batch:
    size = logits.shape[2:]
    out = SegmentationOutput(logits, torch.zeros(logits.shape[0], 1, *size), [])
    return Batch(torch.zeros(1, 3, *size), labels, out, SegmentationOutput(old_logits, out.features, []))


def stub_ctx(num_classes: int, num_old: int) -> StepContext:
    """A step-1 context for the per-iteration terms, which read only the class counts."""
    classes = [f"c{i}" for i in range(num_classes)]
    return StepContext(1, stub_model(), stub_model(), num_old, classes, NO_DATA, torch.device("cpu"))


def test_ali_value_and_gradient() -> None:
    z = torch.tensor([1.0, 2.0, 0.5, -1.0]).view(1, 4, 1, 1).requires_grad_(True)  # 3 old classes, 1 new
    old = torch.tensor([0.2, 0.3, 1.0]).view(1, 3, 1, 1)
    loss = adaptive_logit_regularizer(z, old, torch.ones(1, 1, 1, dtype=torch.bool))
    p_old = torch.softmax(old.flatten(), dim=0)
    expected = torch.logsumexp(z.detach().flatten(), dim=0) - (p_old * z.detach().flatten()[:3]).sum()
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    softmax = torch.softmax(z.detach().flatten(), dim=0)
    assert z.grad is not None
    torch.testing.assert_close(z.grad.flatten(), softmax - torch.cat([p_old, torch.zeros(1)]))


def test_ali_averages_over_background_pixels_only() -> None:
    z = torch.randn(1, 3, 1, 3)
    old = torch.randn(1, 2, 1, 3)
    labels = torch.tensor([[[0, 2, 0]]])
    loss = AdaptiveLogitRegularizer()(logits_batch(z, old, labels), stub_ctx(3, 2))
    per_pixel = [
        adaptive_logit_regularizer(z[..., i : i + 1], old[..., i : i + 1], torch.ones(1, 1, 1).bool())
        for i in (0, 2)
    ]
    assert loss.item() == pytest.approx(torch.stack(per_pixel).sum().item() / 2)


def test_new_class_cross_entropy_ignores_background_and_never_nans() -> None:
    z = torch.randn(1, 3, 1, 3)
    labels = torch.tensor([[[0, 2, 255]]])
    loss = NewClassCrossEntropy()(logits_batch(z, torch.zeros(1, 2, 1, 3), labels), stub_ctx(3, 2))
    # ALIFE run_step1.py 142-143: background -> 255, CE(reduction='none').mean() over all 3 pixels
    expected = -torch.log_softmax(z[0, :, 0, 1], dim=0)[2] / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    only_background = torch.tensor([[[0, 0, 255]]])
    assert (
        NewClassCrossEntropy()(logits_batch(z, torch.zeros(1, 2, 1, 3), only_background), stub_ctx(3, 2)) == 0
    )


def test_new_class_cross_entropy_is_normalised_by_all_pixels_not_new_ones() -> None:
    """1 new-class pixel among 20: the loss is 1/20 of that pixel's CE (ours was 20x that)."""
    z = torch.randn(1, 4, 4, 5)
    labels = torch.zeros(1, 4, 5, dtype=torch.long)
    labels[0, 2, 3] = 3
    loss = NewClassCrossEntropy()(logits_batch(z, torch.zeros(1, 3, 4, 5), labels), stub_ctx(4, 3))
    pixel_ce = -torch.log_softmax(z[0, :, 2, 3], dim=0)[3]
    assert loss.item() == pytest.approx(pixel_ce.item() / 20, rel=1e-5)


@pytest.mark.parametrize(
    ("num_new", "step", "expected"),
    [
        (1, 1, StepWeights(3.0, 1.0, 3.0, 1.0)),  # configs/voc/15-5s/1_step1.yml, M1_step3.yml
        (1, 2, StepWeights(5.0, 10.0, 5.0, 20.0)),  # 15-5s/2_step1.yml, M2_step3.yml
        (1, 3, StepWeights(2.0, 1.0, 2.0, 1.0)),
        (1, 4, StepWeights(3.0, 10.0, 3.0, 2.0)),
        (1, 5, StepWeights(2.0, 1.0, 1.0, 1.0)),
        (1, 9, StepWeights(2.0, 1.0, 1.0, 1.0)),  # later steps reuse the protocol's last row
        (2, 1, StepWeights(3.0, 1.0, 3.0, 1.0)),  # 2 is nearer 1 than 5 on a log scale
        (3, 1, StepWeights(2.0, 1.0, 1.0, 10.0)),  # VOC 15-5: 15-5/1_step1.yml, M1_step3.yml
        (5, 4, StepWeights(2.0, 1.0, 1.0, 10.0)),
        (10, 4, StepWeights(1.0, 1.0, 0.0, 0.1)),  # ADE 100-10: 100-10/4_step1.yml, M4_step3.yml
        (50, 1, StepWeights(1.0, 1.0, 0.0, 0.5)),  # ADE 100-50
    ],
)
def test_reference_weights_per_step_size_and_index(num_new: int, step: int, expected: StepWeights) -> None:
    assert reference_weights(num_new, step) == expected


def test_stage_one_terms_take_the_reference_weight_of_each_step_unless_given() -> None:
    method = alife(replay=False)
    given = alife(kd=7.0, replay=False)
    for step, (ali, kd) in enumerate([(3.0, 1.0), (5.0, 10.0), (2.0, 1.0)], start=1):
        model = stub_model(num_classes=16 + step)  # a 1-class step after 15 + step classes
        ctx = StepContext(step, model, stub_model(), 15 + step, [], NO_DATA, torch.device("cpu"))
        method.on_step_start(ctx)
        given.on_step_start(ctx)
        assert [t.weight for t in method.terms[1:]] == [ali, kd]
        assert [t.weight for t in given.terms[1:]] == [ali, 7.0]


def test_focal_loss_against_the_formula() -> None:
    z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]]).T.reshape(1, 3, 1, 2)
    labels = torch.tensor([[[0, 255]]])
    p_t = torch.softmax(torch.tensor([2.0, 0.5, -1.0]), dim=0)[0]
    expected = (1 - p_t) ** 2 * -torch.log(p_t) / 2  # ignored pixel counts 0 in the mean
    assert focal_loss(z, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert focal_loss(z, labels, gamma=0.0).item() == pytest.approx(-torch.log(p_t).item() / 2, rel=1e-6)


def test_batchnorm_frozen_in_backbone_and_context_only() -> None:
    model = BiSeNet(BiSeNetConfig(4, "resnet10", 16, 16), aux=True)
    frozen = {id(m) for m in alife().frozen_batchnorm_layers(model)}
    expected = {
        id(m)
        for part in (model.spatial_path, model.context_path)
        for m in part.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }
    assert frozen == expected
    assert all(id(m) not in frozen for m in model.head.embed.modules())
    assert all(id(m) not in frozen for m in model.fusion.modules())


def test_distillation_on_non_background_pixels() -> None:
    z, old = torch.randn(1, 3, 1, 3), torch.randn(1, 2, 1, 3)
    labels = torch.tensor([[[0, 2, 255]]])
    loss = ForegroundDistillation()(logits_batch(z, old, labels), stub_ctx(3, 2))
    per_pixel = -(torch.log_softmax(z[:, :2], dim=1) * torch.softmax(old, dim=1)).mean(dim=1)  # (1, 1, 3)
    assert loss.item() == pytest.approx(per_pixel[0, 0, 1:].mean().item())


@pytest.mark.parametrize(("seed", "dim"), [(0, 8), (1, 32), (2, 64), (3, 256)])
def test_cayley_rotation_is_orthogonal_with_determinant_one(seed: int, dim: int) -> None:
    rotation = CayleyRotation(3, dim)
    with torch.no_grad():
        rotation.upper.copy_(torch.randn(rotation.upper.shape, generator=torch.Generator().manual_seed(seed)))
    matrices = rotation.matrices()  # (3, D, D)
    eye = torch.eye(dim).expand(3, dim, dim)
    torch.testing.assert_close(matrices @ matrices.transpose(1, 2), eye, atol=1e-5, rtol=0)
    # One matrix at a time: batched CPU LU fails in torch 2.14 after set_num_threads (see CayleyRotation).
    determinants = torch.stack([torch.linalg.det(m) for m in matrices.double()])
    torch.testing.assert_close(determinants, torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)
    x = torch.randn(3, dim)
    torch.testing.assert_close(rotation(x), torch.einsum("kij,kj->ki", matrices, x))


def test_cayley_rotation_starts_at_identity_and_has_gradients() -> None:
    rotation = CayleyRotation(2, 5)
    torch.testing.assert_close(rotation.matrices(), torch.eye(5).expand(2, 5, 5))
    rotation(torch.randn(2, 5)).pow(2).sum().backward()
    assert rotation.upper.grad is not None and rotation.upper.grad.shape == (2, 10)


def test_rotate_memory_applies_each_class_rotation() -> None:
    memory = FeatureMemory(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long))
    quarter = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    rotated = rotate_memory(memory, torch.stack([torch.eye(2), quarter]), torch.tensor([0, 1]))
    torch.testing.assert_close(rotated.features[[0, 2]], memory.features[[0, 2]])
    torch.testing.assert_close(rotated.features[[1, 3]], memory.features[[1, 3]] @ quarter.T)


def test_soft_assignment_prefers_pixels_like_the_memory() -> None:
    memory = FeatureMemory(
        torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 3]), torch.zeros(2).long()
    )
    pixels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weights = soft_class_assignment(memory, torch.tensor([0, 3]), pixels, temperature=10.0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert weights[0].argmax() == 0 and weights[1].argmax() == 1


def tiny_ctx(step: int, num_classes: int, num_old: int, dataset: Dataset) -> StepContext:
    model = BiSeNet(BiSeNetConfig(num_classes, "resnet10", 16, 16), aux=False)
    old = None
    if num_old:
        old = BiSeNet(BiSeNetConfig(num_old, "resnet10", 16, 16), aux=False).eval()
        model.load_state_dict(
            {k: v for k, v in old.state_dict().items() if "classifier" not in k}, strict=False
        )
    loader = DataLoader(dataset, batch_size=2, shuffle=True)
    return StepContext(
        step, model, old, num_old, [f"c{i}" for i in range(num_classes)], loader, torch.device("cpu")
    )


def test_extract_memory_stores_area_weighted_class_means() -> None:
    dataset = TinySet([1, 2], n=2)
    ctx = tiny_ctx(0, 3, 0, dataset)
    memory = extract_memory(ctx, [0, 1, 2], ReplayOptions(memory_size=3))
    assert memory.features.shape == (9, 16) and memory.features.dtype == torch.float16
    assert memory.classes.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and memory.steps.tolist() == [0] * 9
    ctx.model.eval()
    with torch.no_grad():
        features = ctx.model.forward_features(dataset.images)  # (2, 16, 4, 4)
    cells = F.interpolate((dataset.masks == 1).float()[:, None], size=(4, 4), mode="area")  # (2, 1, 4, 4)
    per_image = (features * cells).sum(dim=(2, 3)) / cells.sum(dim=(2, 3))  # (2, 16)
    for vector in memory.features[3:6].float():  # each drawn from one of the two images
        assert min((vector - mean).abs().max().item() for mean in per_image) < 1e-2


def test_finetuning_changes_only_the_classifier() -> None:
    ctx = tiny_ctx(1, 4, 3, TinySet([3]))
    memory = FeatureMemory(torch.randn(6, 16).half(), torch.tensor([0, 0, 1, 1, 2, 2]), torch.zeros(6).long())
    ctx.model.train()
    before = copy.deepcopy(ctx.model.state_dict())
    finetune_classifier(ctx, memory, ReplayOptions(**REPLAY).for_step(ctx))
    after = ctx.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.classifier.weight", "head.classifier.bias"}
    assert all(p.requires_grad for p in ctx.model.parameters())


def test_two_step_alife_run_builds_rotates_and_saves_the_memory(tmp_path) -> None:
    step0, _ = train_step(None, ["a", "b"], TinySet([1, 2]), None, alife(**REPLAY), TINY_OPTIONS)
    memory0 = step0.state[FEATURE_MEMORY]
    assert memory0["classes"].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    step1, scores = train_step(
        step0, ["c"], TinySet([3]), TinySet([1, 2, 3], seed=1), alife(**REPLAY), TINY_OPTIONS
    )
    assert step1.model.num_classes == 4 and scores is not None
    memory = step1.state[FEATURE_MEMORY]
    assert set(memory) == {"features", "classes", "steps"}  # vectors and indices only, no pixels
    assert memory["features"].shape == (32, 16) and memory["features"].dtype == torch.float16
    assert memory["classes"].tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
    assert memory["steps"].tolist() == [0] * 24 + [1] * 8
    assert not torch.equal(memory["features"][:24], memory0["features"])  # old classes were rotated
    norms = memory["features"][:24].float().norm(dim=1)  # a rotation keeps lengths
    torch.testing.assert_close(norms, memory0["features"].float().norm(dim=1), atol=2e-2, rtol=2e-3)
    loaded = ModelBundle.load(step1.save(tmp_path / "model"))
    for key, value in memory.items():
        assert torch.equal(loaded.state[FEATURE_MEMORY][key], value.cpu())
    rotations = loaded.state[ROTATIONS]
    assert rotations["classes"].tolist() == [0, 1, 2] and rotations["rotations"].shape == (3, 16, 16)
    eye = torch.eye(16).expand(3, 16, 16)
    torch.testing.assert_close(
        rotations["rotations"] @ rotations["rotations"].transpose(1, 2), eye, atol=1e-5, rtol=0
    )


def test_finetune_loss_mixes_focal_ali_and_memory_as_the_reference() -> None:
    """ALIFE ``run_step3.py`` 140-148 with ``models/losses.py`` 10-25 (FocalLoss) and 123-124 (memory CE)."""
    # One image of 4 pixels, 3 old classes and 1 new: background, new class 3, ignored, background.
    z = [[0.5, 1.0, -0.5, 2.0], [1.5, 0.0, 0.3, -1.0], [0.2, 0.4, 0.6, 0.8], [-0.3, 2.2, 0.1, 0.0]]
    old = [[0.0, 1.0, 3.0], [2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 2.5, 0.0]]  # argmax 2 and 1 at 0 and 3
    labels = torch.tensor([[[0, 3, 255, 0]]])
    memory_z = [[2.0, 0.0, 0.0, 1.0], [0.0, -1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 3.0]]
    memory_classes = torch.tensor([0, 1, 2])
    options = ReplayOptions(finetune_ali=3.0, memory_weight=20.0)

    def ce(logits: list[float], target: int) -> float:
        return math.log(sum(math.exp(v) for v in logits)) - logits[target]

    def softmax(logits: list[float]) -> list[float]:
        total = sum(math.exp(v) for v in logits)
        return [math.exp(v) / total for v in logits]

    gt_comb = [2, 3, None, 1]  # background takes the old model's argmax, 255 stays ignored
    focal = sum(
        (1 - math.exp(-ce(z[p], t))) ** 2 * ce(z[p], t) for p, t in enumerate(gt_comb) if t is not None
    )
    ali = [
        math.log(sum(math.exp(v) for v in z[p]))
        - sum(q * v for q, v in zip(softmax(old[p]), z[p][:3], strict=True))
        for p in (0, 3)
    ]
    memory_ce = sum(ce(row, c) for row, c in zip(memory_z, [0, 1, 2], strict=True)) / 3
    expected = focal / 4 + 3.0 * sum(ali) / 2 + 20.0 * memory_ce

    logits = torch.tensor(z).T.reshape(1, 4, 1, 4)
    old_logits = torch.tensor(old).T.reshape(1, 3, 1, 4)
    loss = finetune_loss(logits, old_logits, labels, torch.tensor(memory_z), memory_classes, options)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    empty = finetune_loss(
        logits, old_logits, labels, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), options
    )
    assert empty.item() == pytest.approx(focal / 4 + 3.0 * sum(ali) / 2, rel=1e-5)


def test_alife_trains_at_the_trainers_incremental_multiples() -> None:
    """BENCHMARKS.md "ALIFE's learning rates": at ALIFE's one rate the step's class scored 0.0."""
    method = alife(replay=False)
    rates = resolve_multipliers(True, *(term.lr_multipliers for term in method.terms))
    assert rates == resolve_multipliers(True)  # no override of the trainer's incremental defaults
    assert rates[ParamGroup.HEAD] == 10.0 and rates[ParamGroup.NEW_CLASSES] == 100.0
