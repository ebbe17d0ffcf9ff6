"""Learning rates per parameter group, the new classifier rows' gradient scaling and the iteration floor."""

from __future__ import annotations

import pytest
import torch

from training.models.bisenet import BACKBONES, BiSeNet, BiSeNetConfig, bias_of
from training.optim import (
    INCREMENTAL_STEP_MULTIPLIERS,
    ParamGroup,
    build_optimizer,
    classifiers,
    epochs_for,
    group_of,
    resolve_multipliers,
    scale_new_rows,
)


def _grown_model(num_old: int = 3, num_new: int = 2) -> BiSeNet:
    torch.manual_seed(0)
    model = BiSeNet(BiSeNetConfig(num_old, "resnet10", context_channels=16, embed_channels=16), aux=True)
    model.add_classes(num_new)
    return model


def test_every_parameter_has_one_group_and_the_groups_are_the_model_parts() -> None:
    model = _grown_model()
    groups = {name: group_of(name) for name, _ in model.named_parameters()}
    resnet = {name for name, _ in BACKBONES["resnet10"][0]().named_parameters() if not name.startswith("fc.")}
    backbone = {name for name, group in groups.items() if group is ParamGroup.BACKBONE}
    assert len(backbone) == len(resnet)  # the ResNet's own parameters, nothing of the BiSeNet parts
    classifier_params = {id(p) for c in classifiers(model) for p in c.parameters()}
    in_classifier = {id(p) for name, p in model.named_parameters() if groups[name] is ParamGroup.CLASSIFIER}
    assert in_classifier == classifier_params
    assert len(classifier_params) == 6  # weight and bias of the main and two auxiliary classifiers
    assert groups["fusion.conv.0.weight"] is ParamGroup.HEAD
    spatial = {name for name, group in groups.items() if group is ParamGroup.SPATIAL_PATH}
    assert spatial == {f"spatial_path.{name}" for name, _ in model.spatial_path.named_parameters()}
    assert groups["head.embed.0.weight"] is ParamGroup.HEAD
    assert groups["context_path.arm16.conv.0.weight"] is ParamGroup.HEAD


def test_optimizer_groups_run_at_their_multiples_of_the_step_lr() -> None:
    model = _grown_model()
    multipliers = resolve_multipliers(True)
    optimizer = build_optimizer(model, 0.002, multipliers, momentum=0.9, weight_decay=1e-4)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    expected = {g.value: 0.002 * m for g, m in INCREMENTAL_STEP_MULTIPLIERS.items()}
    expected[ParamGroup.SPATIAL_PATH.value] = expected[ParamGroup.HEAD.value]  # follows the heads
    del expected[ParamGroup.NEW_CLASSES.value]
    assert rates == pytest.approx(expected)  # new rows: scaled inside the classifier group
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters()}


def test_multipliers_step_zero_defaults_then_method_then_options() -> None:
    assert resolve_multipliers(False) == dict.fromkeys(ParamGroup, 1.0)
    assert resolve_multipliers(True)[ParamGroup.NEW_CLASSES] > resolve_multipliers(True)[ParamGroup.BACKBONE]
    method = {ParamGroup.HEAD: 3.0, ParamGroup.NEW_CLASSES: 50.0}
    options = {"new_classes": 7.0}
    merged = resolve_multipliers(True, method, None, options)
    assert merged[ParamGroup.HEAD] == 3.0 and merged[ParamGroup.NEW_CLASSES] == 7.0
    assert merged[ParamGroup.BACKBONE] == INCREMENTAL_STEP_MULTIPLIERS[ParamGroup.BACKBONE]
    with pytest.raises(ValueError, match="must be > 0"):
        resolve_multipliers(True, {"classifier": 0.0})
    with pytest.raises(ValueError, match="must be > 0"):
        resolve_multipliers(True, {"spatial_path": 0.0})


def test_spatial_path_follows_the_heads_unless_a_method_or_the_user_names_it() -> None:
    assert resolve_multipliers(True)[ParamGroup.SPATIAL_PATH] == INCREMENTAL_STEP_MULTIPLIERS[ParamGroup.HEAD]
    assert resolve_multipliers(True, {ParamGroup.HEAD: 1.0})[ParamGroup.SPATIAL_PATH] == 1.0  # e.g. PLOP's
    assert resolve_multipliers(True, {"head": 1.0}, {"spatial_path": 0.5})[ParamGroup.SPATIAL_PATH] == 0.5
    named = resolve_multipliers(True, {"spatial_path": 0.1}, {"head": 4.0})
    assert named[ParamGroup.SPATIAL_PATH] == 0.1 and named[ParamGroup.HEAD] == 4.0
    with pytest.raises(ValueError):
        resolve_multipliers(True, {"decoder": 1.0})


def _classifier_grads(model: BiSeNet) -> list[torch.Tensor]:
    model.zero_grad()
    out = model.forward_train(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    (out.logits.square().mean() + sum(a.square().mean() for a in out.aux_logits)).backward()
    grads = []
    for classifier in classifiers(model):
        for parameter in (classifier.weight, bias_of(classifier)):
            assert parameter.grad is not None
            grads.append(parameter.grad.clone())
    return grads


def test_new_rows_gradient_is_scaled_and_the_hooks_come_off() -> None:
    model = _grown_model(num_old=3, num_new=2)
    model.train()
    plain = _classifier_grads(model)
    handles = scale_new_rows(model, num_old=3, factor=10.0)
    assert len(handles) == 6
    scaled = _classifier_grads(model)
    for before, after in zip(plain, scaled, strict=True):
        torch.testing.assert_close(after[:3], before[:3])
        torch.testing.assert_close(after[3:], 10.0 * before[3:])
    for handle in handles:
        handle.remove()
    for before, after in zip(plain, _classifier_grads(model), strict=True):
        torch.testing.assert_close(after, before)
    assert scale_new_rows(model, num_old=0, factor=10.0) == []  # step 0: no rows are new


@pytest.mark.parametrize(
    ("epochs", "per_epoch", "floor", "expected"),
    [(10, 3, 200, 67), (10, 30, 200, 10), (8, 6, 0, 8), (1, 1, 5, 5)],
)
def test_iteration_floor_adds_epochs(epochs: int, per_epoch: int, floor: int, expected: int) -> None:
    assert epochs_for(epochs, per_epoch, floor) == expected
