from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_OPTIONS, TinySet
from training.methods import build_method
from training.methods.base import Method
from training.methods.standard import CrossEntropy
from training.optim import INCREMENTAL_STEP_MULTIPLIERS, ParamGroup
from training.trainer import StepCancelled, StepOptions, StepProgress, batchnorm_layers, train_step


def test_frozen_batchnorm_keeps_statistics_and_affine_parameters() -> None:
    base, _ = train_step(None, ["a", "b"], TinySet([1, 2]), None, build_method("ft"), TINY_OPTIONS)
    frozen = Method("ft-frozen-bn", [CrossEntropy()], freeze_batchnorm=True)
    grown, _ = train_step(base, ["c"], TinySet([3]), None, frozen, TINY_OPTIONS)
    for before, after in zip(batchnorm_layers(base.model), batchnorm_layers(grown.model), strict=True):
        torch.testing.assert_close(after.running_mean, before.running_mean)
        torch.testing.assert_close(after.weight, before.weight)
    moving, _ = train_step(base, ["c"], TinySet([3]), None, build_method("ft"), TINY_OPTIONS)
    changed = [
        not torch.equal(a.get_buffer("running_mean"), b.get_buffer("running_mean"))
        for a, b in zip(batchnorm_layers(base.model), batchnorm_layers(moving.model), strict=True)
    ]
    assert any(changed)  # without the flag the statistics move


def test_alife_freezes_batchnorm_and_combinations_keep_it() -> None:
    assert build_method("alife").freeze_batchnorm
    assert not build_method("mib").freeze_batchnorm


def test_progress_reports_every_phase_in_order() -> None:
    reports: list[StepProgress] = []
    train_step(
        None,
        ["a", "b"],
        TinySet([1, 2]),
        TinySet([1, 2], seed=1),
        build_method("ft"),
        TINY_OPTIONS,
        reports.append,
    )
    phases = [r.phase for r in reports]
    training = [r for r in reports if r.phase == "training"]
    assert phases == ["preparing", *["training"] * len(training), "end-of-step", "evaluating"]
    assert [r.iteration for r in training] == list(range(1, training[-1].total_iterations + 1))
    assert reports[-1].fraction == 1.0 and reports[-1].losses == {} and reports[-1].loss == training[-1].loss


def test_should_stop_cancels_between_iterations_and_phases() -> None:
    calls = []

    def stop_after(n: int):
        def should_stop() -> bool:
            calls.append(1)
            return len(calls) > n

        return should_stop

    with pytest.raises(StepCancelled, match="before preparing"):
        train_step(None, ["a"], TinySet([1]), None, build_method("ft"), TINY_OPTIONS, None, lambda: True)
    with pytest.raises(StepCancelled, match=r"during training \(iteration 1 of"):
        train_step(None, ["a"], TinySet([1]), None, build_method("ft"), TINY_OPTIONS, None, stop_after(2))


class _CrossEntropyWithOwnRates(CrossEntropy):
    lr_multipliers = {ParamGroup.HEAD: 2.0, ParamGroup.NEW_CLASSES: 5.0}


def test_incremental_step_learning_rates_per_group_and_iteration_floor() -> None:
    floor = TINY_OPTIONS.model_copy(update={"min_iterations": 7})
    base, _ = train_step(None, ["a", "b"], TinySet([1, 2]), None, build_method("ft"), floor)
    assert base.history[-1]["iterations"] == 2  # step 0: 4 images, batch 2, one epoch; no floor
    assert base.history[-1]["learning_rates"] == dict.fromkeys(ParamGroup, 0.01)
    reports: list[StepProgress] = []
    grown, _ = train_step(base, ["c"], TinySet([3]), None, build_method("ft"), floor, reports.append)
    record = grown.history[-1]
    assert record["iterations"] == 8  # 2 per epoch, raised to 4 epochs to reach 7
    assert [r.iteration for r in reports if r.losses] == list(range(1, 9))  # the training reports
    expected = {group: 0.001 * m for group, m in INCREMENTAL_STEP_MULTIPLIERS.items()}
    expected[ParamGroup.SPATIAL_PATH] = expected[ParamGroup.HEAD]  # follows the heads
    assert record["learning_rates"] == pytest.approx(expected)

    own = Method("ft-own-rates", [_CrossEntropyWithOwnRates()])
    grown, _ = train_step(base, ["c"], TinySet([3]), None, own, TINY_OPTIONS)
    rates = grown.history[-1]["learning_rates"]
    own_rates = {ParamGroup.HEAD: 0.002, ParamGroup.SPATIAL_PATH: 0.002, ParamGroup.NEW_CLASSES: 0.005}
    assert rates == pytest.approx(expected | own_rates)
    chosen = TINY_OPTIONS.model_copy(update={"lr_multipliers": {"new_classes": 3.0}})
    grown, _ = train_step(base, ["c"], TinySet([3]), None, own, chosen)
    assert grown.history[-1]["learning_rates"][ParamGroup.NEW_CLASSES] == pytest.approx(0.003)  # options win


def test_step_options_refuse_unknown_groups_and_non_positive_rates() -> None:
    with pytest.raises(ValueError, match="unknown parameter groups"):
        StepOptions(lr_multipliers={"decoder": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        StepOptions(lr_multipliers={"backbone": 0.0})


@pytest.mark.parametrize("method", ["ft", "mib"])
def test_an_incremental_step_on_tiny_data_learns_its_class(method: str) -> None:
    """Before the learning rates per group and the floor, the new class scored IoU 0.0 here."""
    base_options = TINY_OPTIONS.model_copy(update={"epochs": 5})
    base, _ = train_step(None, ["a", "b"], TinySet([1, 2], n=8), None, build_method("ft"), base_options)
    val = TinySet([3, 1], n=8, seed=5)
    step_options = TINY_OPTIONS.model_copy(update={"min_iterations": 30})
    _, scores = train_step(base, ["c"], TinySet([3], n=8), val, build_method(method), step_options)
    assert scores is not None and (iou := scores.per_class_iou["c"]) is not None and iou > 0.5
    one_rate = {group.value: 1.0 for group in ParamGroup}
    old_ways = TINY_OPTIONS.model_copy(update={"lr_multipliers": one_rate})  # one lr, 4 iterations
    _, scores = train_step(base, ["c"], TinySet([3], n=8), val, build_method(method), old_ways)
    assert scores is not None and (iou := scores.per_class_iou["c"]) is not None and iou < 0.1
