from __future__ import annotations

import torch

from tests.helpers import TINY_OPTIONS, TinySet
from training.methods import build_method
from training.methods.base import Method
from training.methods.standard import CrossEntropy
from training.trainer import batchnorm_layers, train_step


def test_frozen_batchnorm_keeps_statistics_and_affine_parameters() -> None:
    base, _ = train_step(None, ["a", "b"], TinySet([1, 2]), None, build_method("ft"), TINY_OPTIONS)
    frozen = Method("ft-frozen-bn", [CrossEntropy()], freeze_batchnorm=True)
    grown, _ = train_step(base, ["c"], TinySet([3]), None, frozen, TINY_OPTIONS)
    for before, after in zip(batchnorm_layers(base.model), batchnorm_layers(grown.model), strict=True):
        torch.testing.assert_close(after.running_mean, before.running_mean)
        torch.testing.assert_close(after.weight, before.weight)
    moving, _ = train_step(base, ["c"], TinySet([3]), None, build_method("ft"), TINY_OPTIONS)
    changed = [
        not torch.equal(a.running_mean, b.running_mean)
        for a, b in zip(batchnorm_layers(base.model), batchnorm_layers(moving.model), strict=True)
    ]
    assert any(changed)  # without the flag the statistics move


def test_alife_freezes_batchnorm_and_combinations_keep_it() -> None:
    assert build_method("alife").freeze_batchnorm
    assert not build_method("mib").freeze_batchnorm
