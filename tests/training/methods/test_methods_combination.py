"""Combining methods sums their terms; the new methods are registered by name."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.methods import METHODS, build_method
from training.methods.base import Batch, StepContext
from training.methods.sdr import sdr
from training.methods.standard import mib
from training.models.bisenet import BiSeNet, BiSeNetConfig


def step_one() -> tuple[StepContext, Batch]:
    """A step-1 context (3 old classes + 1 new) and one batch through both models."""
    torch.manual_seed(0)
    old = BiSeNet(BiSeNetConfig(3, "resnet10", 16, 16), aux=False).eval()
    model = copy.deepcopy(old)
    model.aux_heads = torch.nn.ModuleList()
    model.add_classes(1)
    images = torch.randn(2, 3, 64, 64)  # 64 px: the backbone output SDR works on is 2x2
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :32, :32], labels[:, -1] = 3, 255
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    state = {"prototypes": {"prototypes": torch.randn(3, 512), "counts": torch.tensor([5, 5, 5])}}
    ctx = StepContext(1, model, old, 3, ["bg", "a", "b", "c"], loader, torch.device("cpu"), state)
    model.train()
    with torch.no_grad():
        old_out = old.forward_train(images)
    return ctx, Batch(images, labels, model.forward_train(images), old_out)


def test_new_methods_are_registered() -> None:
    assert {"sdr", "alife", "plop"} <= set(METHODS)
    assert [t.name for t in build_method("plop").terms] == ["plop_ce", "local_pod"]
    assert [t.name for t in build_method("alife").terms] == ["alife_ce", "ali", "alife_kd"]


@pytest.mark.parametrize("spec", ["sdr", "plop+mib", "alife+ft"])
def test_combinations_need_exactly_one_classifier(spec: str) -> None:
    with pytest.raises(ValueError, match="classification"):
        build_method(spec)


@pytest.mark.parametrize("spec", ["alife+sdr", "plop+sdr", "ft+sdr"])
def test_sdr_adds_to_any_classifier(spec: str) -> None:
    assert len(build_method(spec).terms) == len(METHODS[spec.split("+")[0]]().terms) + 4


def test_mib_plus_sdr_sums_the_terms_of_each() -> None:
    ctx, batch = step_one()
    state = copy.deepcopy(ctx.state)
    combined = build_method("mib+sdr")
    combined.on_step_start(ctx)
    together = combined.losses(batch, ctx)

    ctx.state = copy.deepcopy(state)
    parts = {}
    for method in (mib(), sdr()):
        method.on_step_start(ctx)
        parts.update(method.losses(batch, ctx))
    assert all(value > 0 for value in parts.values())
    assert (
        together.keys()
        == parts.keys()
        == {
            "unbiased_ce",
            "unbiased_kd",
            "sdr_matching",
            "sdr_attraction",
            "sdr_repulsion",
            "sdr_sparsity",
        }
    )
    for name, value in parts.items():
        torch.testing.assert_close(together[name], value)
    total = torch.stack(list(together.values())).sum()
    torch.testing.assert_close(total, torch.stack(list(parts.values())).sum())
    total.backward()  # every term is differentiable together
