from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import NO_DATA
from training.methods import build_method, split_top_level
from training.methods.alife import NewClassCrossEntropy
from training.methods.base import Batch, StepContext
from training.models.bisenet import BiSeNet, BiSeNetConfig


def context_and_batch(step: int = 1) -> tuple[StepContext, Batch]:
    torch.manual_seed(0)
    old = BiSeNet(BiSeNetConfig(3, "resnet10", 16, 16), aux=False).eval()
    model = BiSeNet(BiSeNetConfig(3, "resnet10", 16, 16))
    model.add_classes(2)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    ctx = StepContext(
        step, model, old if step else None, 3 if step else 0, list("abcde"), NO_DATA, torch.device("cpu")
    )
    batch = Batch(images, labels, model.forward_train(images), old.forward_train(images) if step else None)
    return ctx, batch


@pytest.mark.parametrize(
    ("spec", "terms"),
    [
        ("ft", ["ce"]),
        ("lwf", ["ce", "kd"]),
        ("ilt", ["ce", "kd", "feature_kd"]),
        ("mib", ["unbiased_ce", "unbiased_kd"]),
        ("joint", ["ce"]),
    ],
)
def test_methods_give_finite_losses_with_gradients(spec: str, terms: list[str]) -> None:
    ctx, batch = context_and_batch()
    losses = build_method(spec).losses(batch, ctx)
    assert list(losses) == terms
    total = torch.stack(list(losses.values())).sum()
    total.backward()
    assert torch.isfinite(total) and ctx.model.head.classifier.weight.grad is not None


def test_distillation_terms_are_skipped_at_step_zero() -> None:
    ctx, batch = context_and_batch(step=0)
    assert list(build_method("mib").losses(batch, ctx)) == ["unbiased_ce"]


def test_mib_cross_entropy_at_step_zero_averages_over_all_pixels() -> None:
    """fcdl94/MiB train.py 27-35, 103-107: CrossEntropyLoss(reduction='none') then .mean() over B*H*W."""
    ctx, batch = context_and_batch(step=0)
    batch.labels[:, :8] = 255  # a quarter of the pixels ignored
    loss = build_method("mib").losses(batch, ctx)["unbiased_ce"]
    heads = [batch.out.logits, *batch.out.aux_logits]
    ce_sums = [F.cross_entropy(z, batch.labels, ignore_index=255, reduction="sum") for z in heads]
    torch.testing.assert_close(loss, sum(ce_sums) / batch.labels.numel(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("spec", ["ft", "joint"])
def test_plain_cross_entropy_averages_over_labelled_pixels_only(spec: str) -> None:
    """Unlike MiB's term above: ft/lwf/ilt/joint divide by the labelled pixels (see ``CrossEntropy``)."""
    ctx, batch = context_and_batch(step=0)
    batch.labels[:, :8] = 255  # a quarter of the pixels ignored
    loss = build_method(spec).losses(batch, ctx)["ce"]
    heads = [batch.out.logits, *batch.out.aux_logits]
    ce_sums = [F.cross_entropy(z, batch.labels, ignore_index=255, reduction="sum") for z in heads]
    labelled = (batch.labels != 255).sum()
    torch.testing.assert_close(loss, sum(ce_sums) / labelled, rtol=1e-5, atol=0)


def test_weights_scale_terms() -> None:
    ctx, batch = context_and_batch()
    mib = build_method("mib").losses(batch, ctx)
    from training.losses import unbiased_distillation

    expected = 10 * unbiased_distillation(batch.out.logits, batch.require_old_out().logits)
    torch.testing.assert_close(mib["unbiased_kd"], expected)


@pytest.mark.parametrize(
    ("spec", "message"), [("nope", "unknown"), ("ft+mib", "exactly one"), ("ft+ft", "repeats")]
)
def test_bad_combinations(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_method(spec)


def test_arguments_override_default_weights() -> None:
    method = build_method("mib(kd=100) + sdr(sparsity=1e-4)")
    weights = {term.name: term.weight for term in method.terms}
    assert (
        weights["unbiased_kd"] == 100 and weights["sdr_sparsity"] == 1e-4 and weights["sdr_matching"] == 1e-2
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mib(kd=x)", "keyword=literal"),
        ("mib(3)", "keyword=literal"),
        ("mib(foo=1)", "its arguments are: kd"),
        ("mib(kd=1", "bad method"),
    ],
)
def test_bad_arguments(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_method(spec)


def test_split_top_level() -> None:
    assert split_top_level("ft, mib(kd=1, x=2),alife", ",") == ["ft", "mib(kd=1, x=2)", "alife"]


def test_boolean_and_string_arguments_keep_their_case() -> None:
    assert build_method("MiB(kd=1)").terms[1].weight == 1
    classification = build_method("alife(replay=False)").terms[0]
    assert isinstance(classification, NewClassCrossEntropy) and classification.replay is None
