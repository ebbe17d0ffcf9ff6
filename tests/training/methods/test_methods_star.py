"""STAR on DKD's framework: each loss against its formula, the memory, the sigmoid label rule, a tiny run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import NO_DATA, TINY_OPTIONS, TinySet, stub_model
from training.bench import memory_bytes, run_benchmark
from training.method_spec import METHOD_NAMES, sigmoid_family
from training.methods import build_method
from training.methods.base import Batch, StepContext
from training.methods.star import (
    DISJOINT_FORMULAS,
    OVERLAPPED_FORMULAS,
    SETTING_FORMULAS,
    AuxiliaryClassifier,
    OldRegionFeatures,
    SettingFormulas,
    StarClassification,
    capped_fakes,
    class_bce,
    init_new_rows,
    kaiming_rows,
    merged_counts,
    old_label_map,
    old_region_mse,
    plan_replay,
    prototype_separation,
    sigmoid_distillation,
    star,
)
from training.methods.star_memory import STAR_MEMORY, ClassMemory, MemoryBuilder
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig, SegmentationOutput, bias_of
from training.optim import ParamGroup, build_optimizer, resolve_multipliers
from training.protocols import Setting
from training.trainer import train_step


def _bce(z: float, y: float, pos_weight: float = 1.0) -> float:
    """-(pw * y * log sigmoid(z) + (1 - y) * log(1 - sigmoid(z))), written out."""
    s = 1 / (1 + math.exp(-z))
    return -(pos_weight * y * math.log(s) + (1 - y) * math.log(1 - s))


def test_class_bce_weights_positives_and_treats_ignore_as_negative() -> None:
    logits = torch.tensor([[[[0.5, -1.0]], [[2.0, 0.0]], [[-0.3, 1.5]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[[2, 255]]])  # pixel 0: class 2, pixel 1: ignored
    loss = class_bce(logits, labels, first=1, pos_weight=4.0)  # classes 1 and 2
    expected_1 = (_bce(2.0, 0) + _bce(0.0, 0)) / 2
    expected_2 = (_bce(-0.3, 1, 4.0) + _bce(1.5, 0)) / 2
    assert torch.allclose(loss, torch.tensor([expected_1, expected_2]), atol=1e-6)


def test_sigmoid_distillation_against_formula() -> None:
    logits = torch.tensor([[[[1.0]], [[0.2]], [[-0.7]], [[3.0]]]])  # (1, 4, 1, 1): bg, old 1, old 2, new
    old = torch.tensor([[[[0.0]], [[-1.0]], [[2.0]]]])  # (1, 3, 1, 1)
    s = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-2.0))]
    expected = sum(
        -(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))
        for z, t in zip([0.2, -0.7], s, strict=True)
    )
    assert sigmoid_distillation(logits, old, num_old=3).item() == pytest.approx(expected, abs=1e-6)


def test_old_region_mse_against_formula_and_empty_region() -> None:
    features = torch.arange(8.0).reshape(1, 2, 2, 2)
    old = torch.zeros(1, 2, 2, 2)
    region = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # same size: the interpolation is the identity
    # positions (0,0) and (1,1): squares 0, 9 (channel 0) and 16, 49 (channel 1), / (2 positions * 2 dims)
    assert old_region_mse(features, old, region).item() == pytest.approx((0 + 9 + 16 + 49) / 4)
    assert old_region_mse(features, old, torch.zeros_like(region)).item() == 0


def test_prototype_separation_against_formula() -> None:
    features = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])  # (1, D=2, 1, 2)
    labels = torch.tensor([[[3, 0]]])  # class 3 at pixel 0 (new), background at pixel 1
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    centre = torch.tensor([0.6, 0.8])  # normalised feature of class 3
    nearest = min((centre - p).norm() for p in prototypes)
    absent = 1.0  # class 4 is absent: a zero centre, distance 1 to a unit prototype
    expected = (1 / nearest + 1 / absent) / 2
    loss = prototype_separation(features, labels, first=3, num_classes=5, prototypes=prototypes)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_memory_builder_matches_the_reference_two_pass_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 3, 3, generator=gen) + 1  # (B, D, h, w)
    labels = torch.randint(0, 3, (2, 3, 3), generator=gen)  # same size as the features
    builder = MemoryBuilder([1, 2], 4, torch.device("cpu"))
    builder.update(features[:1], labels[:1])
    builder.update(features[1:], labels[1:])
    memory = builder.build()
    flat = features.permute(0, 2, 3, 1)
    for row, cls in enumerate([1, 2]):
        f = flat[labels == cls]
        unit = F.normalize(f, dim=1)
        prototype = F.normalize(unit.sum(0), dim=0)
        assert torch.allclose(memory.prototypes[row], prototype, atol=1e-5)
        noise = ((unit - prototype) ** 2).mean(0).sqrt()  # STAR compute_noise
        assert torch.allclose(memory.noise[row], noise, atol=1e-5)
        assert memory.norm_mean[row].item() == pytest.approx(f.norm(dim=1).mean().item(), abs=1e-5)
        assert memory.norm_std[row].item() == pytest.approx(f.norm(dim=1).std().item(), abs=1e-5)
        assert memory.counts[cls].item() == len(f)
    assert memory.counts[0].item() == (labels == 0).sum().item()
    absent = MemoryBuilder([5], 4, torch.device("cpu"))
    absent.update(features, labels)
    empty = absent.build()  # a class with no pixel: zeros, count 0, so it is never replayed
    assert empty.counts[1] == 0 and not empty.prototypes.any() and torch.isfinite(empty.norm_std).all()


def test_fake_features_follow_the_statistics() -> None:
    memory = ClassMemory(
        prototypes=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]),
        noise=torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0]]),
        norm_mean=torch.tensor([5.0, 2.0]),
        norm_std=torch.tensor([0.5, 0.0]),
        counts=torch.tensor([10.0, 4.0, 3.0]),
    )
    fakes = memory.sample(torch.tensor([4000, 3]), torch.Generator().manual_seed(0))
    assert fakes.shape == (4003, 3)
    first, second = fakes[:4000], fakes[4000:]
    assert torch.allclose(first.mean(0), torch.tensor([5.0, 0.0, 0.0]), atol=0.05)
    assert first[:, 1].std().item() == pytest.approx(0.5, rel=0.1)  # noise 0.1 x norm 5
    assert torch.allclose(second, torch.tensor([0.0, 1.2, 1.6]).expand(3, 3))  # no noise: exact


@pytest.mark.parametrize("dim", [16, 256])
def test_memory_is_under_2kb_per_class_and_survives_the_model_directory(tmp_path: Path, dim: int) -> None:
    k = 5
    memory = ClassMemory(
        F.normalize(torch.randn(k, dim), dim=1),
        torch.rand(k, dim),
        torch.rand(k),
        torch.rand(k),
        torch.rand(k + 1),
    )
    model = BiSeNet(BiSeNetConfig(k + 1, "resnet10", 16, dim, sigmoid_outputs=True), aux=False)
    bundle = ModelBundle(model, [f"c{i}" for i in range(k + 1)], [], {STAR_MEMORY: memory.to_state()})
    loaded = ModelBundle.load(bundle.save(tmp_path / "model"))
    assert loaded.model.config.sigmoid_outputs
    restored = ClassMemory.from_state(loaded.state[STAR_MEMORY], torch.device("cpu"))
    assert torch.allclose(restored.prototypes, memory.prototypes, atol=1e-3)  # float16 storage
    assert torch.equal(restored.counts, memory.counts)
    per_class = sum(t.numel() * t.element_size() for t in loaded.state[STAR_MEMORY].values()) / k
    assert per_class <= 2048
    if dim == 256:
        assert per_class == pytest.approx(2 * 256 * 2 + 3 * 4, abs=1)  # + background count / k
    assert memory_bytes(loaded) == sum(
        t.numel() * t.element_size() for t in loaded.state[STAR_MEMORY].values()
    )


def test_sigmoid_outputs_give_the_papers_label_map() -> None:
    torch.manual_seed(0)
    model = BiSeNet(BiSeNetConfig(4, "resnet10", 16, 16, sigmoid_outputs=True), aux=False).eval()
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        features = model.forward_features(images)  # (2, 16, 5, 7)
        classifier = model.head.classifier
        classifier.weight.normal_()
        raw_small = classifier(features)
        # each class passes 0.5 on its top 20 % of positions: about half the pixels are background
        classifier.bias -= raw_small.transpose(0, 1).flatten(1).quantile(0.8, dim=1)
        out = model(images)
        raw = F.interpolate(classifier(features), size=(40, 56), mode="bilinear", align_corners=False)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    # the reference's rule (STAR trainer_voc.py:182-186) on the class logits
    probabilities = raw[:, 1:].sigmoid()
    reference = probabilities.argmax(1) + 1
    reference[(probabilities > 0.5).sum(1) == 0] = 0
    assert torch.equal(out.argmax(1), reference)
    assert 0.2 < (reference == 0).float().mean() < 0.8  # both branches of the rule are exercised


def test_a_softmax_base_is_refused_with_what_to_do() -> None:
    ft = build_method("ft")
    softmax_base, _ = train_step(None, ["a", "b"], TinySet([1, 2], n=4), None, ft, TINY_OPTIONS)
    with pytest.raises(ValueError, match=r"base model \(a softmax\); star cannot continue it"):
        train_step(softmax_base, ["c"], TinySet([3], n=4), None, build_method("star"), TINY_OPTIONS)


@pytest.mark.parametrize("method", ["mib", "ft", "plop", "mib+sdr"])
def test_a_sigmoid_base_is_refused_by_softmax_methods_with_what_to_do(method: str) -> None:
    star_base, _ = train_step(
        None, ["a", "b"], TinySet([1, 2], n=4), None, build_method("star"), TINY_OPTIONS
    )
    with pytest.raises(
        ValueError, match=r"sigmoids\); .* cannot continue it: use a method of the same kind \(star\)"
    ):
        train_step(star_base, ["c"], TinySet([3], n=4), None, build_method(method), TINY_OPTIONS)


def test_bench_trains_stars_own_sigmoid_base(synth_dataset: Path, tmp_path: Path, tiny_options) -> None:
    assert build_method("star").needs_own_base and build_method("star(sad=0)").needs_own_base
    assert not build_method("mib").needs_own_base and not build_method("mib+sdr").needs_own_base
    results = run_benchmark(
        synth_dataset, "4-1-1", "overlapped", ["star"], tiny_options, tmp_path / "models", log=lambda _: None
    )
    assert "base_seconds" not in results  # no shared softmax base was trained
    base = ModelBundle.load(tmp_path / "models" / "star" / "step0")
    assert base.model.config.sigmoid_outputs and base.history[0]["method"] == "star"
    assert base.state[STAR_MEMORY]["prototypes"].shape == (4, 16)
    steps = results["methods"]["star"]["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2] and steps[0]["seconds"] > 0  # two star steps in a row
    assert steps[0]["miou_all"] is not None and steps[2]["memory_bytes"] > steps[1]["memory_bytes"] > 0


def _padded(rows: list[list[float]], dim: int = 8) -> torch.Tensor:
    """Rows of 2 values padded with zeros to ``dim`` (the model's narrowest embedding is 8 wide)."""
    return F.pad(torch.tensor(rows), (0, dim - 2))


def _replay_context() -> tuple[StepContext, Batch]:
    """A 4-class model (3 old, class 3 new) whose classifier reads two feature dimensions."""
    model = BiSeNet(BiSeNetConfig(4, "resnet10", 8, 8, sigmoid_outputs=True), aux=False)
    with torch.no_grad():
        weight = _padded([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, -0.5]])
        model.head.classifier.weight.copy_(weight[..., None, None])
        bias_of(model.head.classifier).copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
    ctx = StepContext(1, model, model, 3, ["bg", "a", "b", "c"], NO_DATA, torch.device("cpu"), {})
    features = _padded([[1.0, 2.0], [-1.0, 0.5]]).T.reshape(1, 8, 1, 2)  # (1, D, 1, 2)
    logits = model.forward_head(features, (1, 2))
    old_logits = torch.tensor([[[[0.0, 0.0]], [[1.0, -1.0]], [[-1.0, -1.0]]]])  # pixel 1: background
    labels = torch.tensor([[[3, 0]]])
    out = SegmentationOutput(logits, features, [])
    return ctx, Batch(torch.zeros(1, 3, 1, 2), labels, out, SegmentationOutput(old_logits, features, []))


def test_replay_and_background_repetition_against_formula() -> None:
    ctx, batch = _replay_context()
    term = StarClassification(pos_weight=4.0, max_replay_weight=None)  # the reference's weights
    term.memory = ClassMemory(
        _padded([[1.0, 0.0], [0.0, 1.0]]),
        torch.zeros(2, 8),
        torch.tensor([2.0, 3.0]),
        torch.zeros(2),
        torch.tensor([5.0, 4.0, 4.0]),
    )
    term.fakes_per_iteration = torch.tensor([2, 1])
    term.background_ratio = 1.5
    loss = term(batch, ctx).item()
    # new class 3: w = (0.5, -0.5), b = 0.3
    z_pixels = [0.5 * 1 - 0.5 * 2 + 0.3, 0.5 * -1 - 0.5 * 0.5 + 0.3]  # classifier at both positions
    real = (_bce(z_pixels[0], 1, 4.0) + _bce(z_pixels[1], 0)) / 2
    fakes = [0.5 * 2 + 0.3, 0.5 * 2 + 0.3, -0.5 * 3 + 0.3]  # (2, 0) twice, (0, 3) once
    fake = sum(_bce(z, 0) for z in fakes) / 3
    repeated = _bce(z_pixels[1], 0)  # position 1: background for the label and the old model
    w_fake, w_bg = 3 / 2, 1.5 * 1 / 2
    expected = (real + w_fake * fake + w_bg * repeated) / (1 + w_fake + w_bg)
    assert loss == pytest.approx(expected, abs=1e-5)
    term.replay = term.background_repeat = False
    assert term(batch, ctx).item() == pytest.approx(real, abs=1e-5)
    # the cap (1 by default, our deviation) scales both replayed weights alike so that they sum to it
    term.replay = term.background_repeat = True
    term.max_replay_weight = StarClassification().max_replay_weight
    assert term.max_replay_weight == 1.0
    scale = 1.0 / (w_fake + w_bg)
    capped = (real + scale * (w_fake * fake + w_bg * repeated)) / 2
    assert term(batch, ctx).item() == pytest.approx(capped, abs=1e-5)
    term.max_replay_weight = 10.0  # above the reference's weights: no change
    assert term(batch, ctx).item() == pytest.approx(expected, abs=1e-5)


def test_replay_per_real_position_keeps_the_reference_share_without_dividing_the_new_classes() -> None:
    ctx, batch = _replay_context()
    term = StarClassification(pos_weight=4.0, max_replay_weight=None, mean_over_replayed=False)
    term.memory = ClassMemory(
        _padded([[1.0, 0.0], [0.0, 1.0]]),
        torch.zeros(2, 8),
        torch.tensor([2.0, 3.0]),
        torch.zeros(2),
        torch.tensor([5.0, 4.0, 4.0]),
    )
    term.fakes_per_iteration = torch.tensor([2, 1])
    term.background_ratio = 1.5
    # the hand-made case of the test above, summed over real positions, fakes and repeats alike and
    # divided by the 2 real feature positions only: real + w_fake * fake + w_bg * repeated
    z_pixels = [0.5 * 1 - 0.5 * 2 + 0.3, 0.5 * -1 - 0.5 * 0.5 + 0.3]
    real = (_bce(z_pixels[0], 1, 4.0) + _bce(z_pixels[1], 0)) / 2
    fake = (2 * _bce(0.5 * 2 + 0.3, 0) + _bce(-0.5 * 3 + 0.3, 0)) / 3
    repeated = _bce(z_pixels[1], 0)
    expected = real + (3 / 2) * fake + (1.5 * 1 / 2) * repeated
    assert term(batch, ctx).item() == pytest.approx(expected, abs=1e-5)
    # the positives' gradient is that of the real term alone, whatever the replay's weight
    logits = batch.out.logits.detach().clone().requires_grad_(True)
    out = SegmentationOutput(logits, batch.out.features, [])
    term(Batch(batch.images, batch.labels, out, batch.old_out), ctx).backward()
    s = 1 / (1 + math.exp(-z_pixels[0]))
    assert logits.grad is not None
    assert logits.grad[0, 3, 0, 0].item() == pytest.approx(4.0 * (s - 1) / 2, abs=1e-5)


def test_star_states_stars_learning_rates_and_freezes_batchnorm() -> None:
    method = build_method("star")
    assert method.freeze_batchnorm
    assert [t.name for t in method.terms] == ["bce", "aux_classifier", "old_region_mse", "sad"]
    assert method.terms[0].lr_multipliers[ParamGroup.NEW_CLASSES] == 100.0  # STAR's 10, our deviation
    assert method.terms[0].lr_multipliers[ParamGroup.BACKBONE] == 0.1
    assert [t.name for t in star(kd=5, sad=0).terms] == ["bce", "aux_classifier", "kd", "old_region_mse"]
    tuned = build_method("star(lr_multipliers={'new_classes': 10})").terms[0].lr_multipliers
    assert tuned[ParamGroup.NEW_CLASSES] == 10 and tuned[ParamGroup.BACKBONE] == 0.1


def test_tiny_step_0_and_step_1_learn_and_keep_the_memory(tmp_path: Path) -> None:
    options = TINY_OPTIONS.model_copy(update={"epochs": 4, "min_iterations": 0})
    base, _ = train_step(None, ["a", "b"], TinySet([1, 2], n=4), None, build_method("star"), options)
    assert base.model.config.sigmoid_outputs
    assert base.state[STAR_MEMORY]["prototypes"].shape == (2, 16)
    base = ModelBundle.load(base.save(tmp_path / "v1"), aux=True)
    base.state[STAR_MEMORY]["counts"] *= 100  # as after a larger step 0: the old classes lack pixels here
    method = build_method("star(kd=5)")
    grown, scores = train_step(
        base,
        ["c"],
        TinySet([3], n=4),
        TinySet([1, 2, 3], n=4),
        method,
        options.model_copy(update={"epochs": 3}),
    )
    replay = method.terms[0]
    assert isinstance(replay, StarClassification) and replay.fakes_per_iteration is not None
    # capped at max_replay_ratio (4) fake vectors per feature position of a batch (2 x 4 x 4)
    assert 0 < replay.fakes_per_iteration.sum() <= 4 * 2 * 4 * 4
    memory = grown.state[STAR_MEMORY]
    assert memory["prototypes"].shape == (3, 16) and memory["counts"].shape == (4,)
    assert torch.equal(memory["prototypes"][:2], base.state[STAR_MEMORY]["prototypes"])
    assert memory["counts"][3] > 0
    assert grown.model.num_classes == 4 and scores is not None and scores.per_class_iou["c"] is not None
    assert grown.history[-1]["method"] == "star(kd=5)"


def _star_base() -> ModelBundle:
    base, _ = train_step(None, ["a", "b"], TinySet([1, 2], n=4), None, build_method("star"), TINY_OPTIONS)
    return base


def _incremental_context(base: ModelBundle) -> StepContext:
    model = copy.deepcopy(base.model)
    model.add_classes(1)
    teacher = copy.deepcopy(base.model).eval()
    loader = DataLoader(TinySet([3], n=4), batch_size=2)
    classes = ["bg", "a", "b", "c"]
    return StepContext(1, model, teacher, 3, classes, loader, torch.device("cpu"), copy.deepcopy(base.state))


def _rates(
    ctx: StepContext, term: StarClassification, options: dict[str, float] | None = None
) -> dict[str, float]:
    """The optimiser's lr per group as the trainer builds it (lr 1e-3, after the term's step-start hook)."""
    multipliers = resolve_multipliers(ctx.old_model is not None, term.lr_multipliers, options)
    optimizer = build_optimizer(ctx.model, 1e-3, multipliers, momentum=0.9, weight_decay=0.0)
    spatial = {id(p) for p in ctx.model.spatial_path.parameters() if p.requires_grad}
    group = next(g for g in optimizer.param_groups if g["name"] == ParamGroup.SPATIAL_PATH)
    assert {id(p) for p in group["params"]} == spatial  # the spatial path and nothing else
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def test_spatial_path_is_a_parameter_group_at_the_backbone_rate_that_the_user_can_override() -> None:
    base = _star_base()
    ctx = _incremental_context(base)
    term = StarClassification()
    term.on_step_start(ctx)
    rates = _rates(ctx, term)
    # STAR's rates: backbone 1e-4 (train_voc.py:127), ASPP 1e-3 (128): the spatial path reads the image
    assert rates["spatial_path"] == pytest.approx(1e-4) and rates["head"] == pytest.approx(1e-3)
    assert not any(p._backward_hooks for p in ctx.model.spatial_path.parameters())  # no gradient scaling
    overridden = _rates(ctx, term, {"spatial_path": 3.0})
    assert overridden["spatial_path"] == pytest.approx(3e-3) and overridden["head"] == pytest.approx(1e-3)
    unscaled = StarClassification(spatial_path_at_backbone_rate=False)
    unscaled.on_step_start(_incremental_context(base))
    assert _rates(ctx, unscaled)["spatial_path"] == pytest.approx(1e-3)  # the heads' rate
    step0 = StarClassification()
    step0.on_step_start(
        StepContext(0, copy.deepcopy(base.model), None, 0, ["bg", "a", "b"], NO_DATA, ctx.device)
    )
    assert step0.lr_multipliers[ParamGroup.SPATIAL_PATH] == step0.lr_multipliers[ParamGroup.HEAD]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_the_sigmoid_family_names_the_methods_that_need_their_own_base(name: str) -> None:
    spec = "mib+sdr" if name == "sdr" else name  # sdr alone is not a method
    assert sigmoid_family(spec) == build_method(spec).needs_own_base
    assert sigmoid_family("star(sad=0)") and not sigmoid_family("mib(kd=100)+sdr")


def _reference_plan(prev: torch.Tensor, pred: torch.Tensor, n_new: int, iters: int, setting: str) -> tuple:
    """STAR trainer_voc.py:327-330, 364-387 transcribed (``prev``: prev_numbers, ``pred``: pred_numbers)."""
    prev_bg = prev[0] * (1 - 0.01 * n_new) if setting == "overlap" else prev[0]
    if setting == "overlap":
        per_iter = ((prev[1:] - pred[1:]) / iters).to(torch.int)
        ratio = prev_bg / pred[0] - 0.5
    else:
        per_iter = (prev[1:] / iters).to(torch.int)
        ratio = prev_bg / pred[0]
    per_iter, ratio = torch.clamp(per_iter, min=0), torch.clamp(ratio, min=0)
    tot = prev.clone()
    if setting == "overlap":
        tot[0] = pred[0] * 0.5 + prev_bg
    else:
        tot[0] = pred[0] + prev_bg
        tot[1:] = prev[1:] + pred[1:]
    return per_iter, float(ratio), tot


@pytest.mark.parametrize(
    ("setting", "formulas", "per_iteration", "ratio", "counts"),
    [
        # 100 * (1 - 0.01 * 2) = 98; 98 / 20 - 0.5 = 4.4; (40 - 10) / 3 -> 10, 7 - 9 < 0 -> 0
        ("overlap", OVERLAPPED_FORMULAS, [10, 0], 4.4, [0.5 * 20 + 98, 40, 7, 11, 12]),
        # 100 / 20 = 5; 40 / 3 -> 13, 7 / 3 -> 2; background 20 + 100, old counts summed: 50, 16
        ("disjoint", DISJOINT_FORMULAS, [13, 2], 5.0, [120, 50, 16, 11, 12]),
    ],
)
def test_replay_plan_and_end_of_step_counts_against_the_reference(
    setting: str, formulas: SettingFormulas, per_iteration: list[int], ratio: float, counts: list[float]
) -> None:
    stored = torch.tensor([100.0, 40.0, 7.0])  # background, old classes 1 and 2
    found = torch.tensor([20.0, 10.0, 9.0])  # what the old model sees in the step's background
    new_counts = torch.tensor([55.0, 11.0, 12.0])  # MemoryBuilder's: [0] is the step's background
    plan = plan_replay(stored, found, num_new=2, iterations=3, formulas=formulas)
    ref_per_iter, ref_ratio, ref_tot = _reference_plan(stored, found, 2, 3, setting)
    assert plan.fakes_per_iteration.tolist() == ref_per_iter.tolist() == per_iteration
    assert plan.background_ratio == pytest.approx(ref_ratio) and ref_ratio == pytest.approx(ratio)
    merged = merged_counts(stored, found, new_counts, plan, formulas)
    assert torch.allclose(merged, torch.cat([ref_tot, new_counts[1:]]))  # trainer_voc.py:387
    assert merged.tolist() == pytest.approx(counts)


def test_each_setting_has_its_formulas_and_nothing_seen_repeats_nothing() -> None:
    assert SETTING_FORMULAS[Setting.OVERLAPPED] is OVERLAPPED_FORMULAS
    assert SETTING_FORMULAS[Setting.DISJOINT] is DISJOINT_FORMULAS
    assert SETTING_FORMULAS[Setting.SEQUENTIAL] is DISJOINT_FORMULAS  # the disjoint images
    assert set(SETTING_FORMULAS) == set(Setting)
    zero = plan_replay(torch.tensor([5.0, 3.0]), torch.zeros(2), 1, 1, OVERLAPPED_FORMULAS)
    assert zero.background_ratio == 0.0  # nothing seen: no repetition (the reference divides by 0)


def test_fakes_are_capped_alike_per_class() -> None:
    per_iteration = torch.tensor([10, 5, 0])
    assert capped_fakes(per_iteration, 6.0).tolist() == [4, 2, 0]  # 10 * 6 / 15, 5 * 6 / 15
    assert capped_fakes(per_iteration, 15.0).tolist() == [10, 5, 0]
    assert capped_fakes(per_iteration, None).tolist() == [10, 5, 0]


def test_old_label_map_thresholds_the_raw_logits() -> None:
    # pixels: classes (0.3, 0.4), (0.7, 0.6), (-1, -2); channel 0 is the model's constant 0
    logits = torch.tensor([[[[0.0, 0.0, 0.0]], [[0.3, 0.7, -1.0]], [[0.4, 0.6, -2.0]]]])  # (1, 3, 1, 3)
    # STAR trainer_voc.py:398-401 on the class logits
    reference = logits[:, 1:].argmax(dim=1) + 1
    reference[(logits[:, 1:] > 0.5).float().sum(dim=1) == 0] = 0
    assert old_label_map(logits, 0.5).tolist() == reference.tolist() == [[[0, 1, 0]]]
    assert old_label_map(logits, 0.0).tolist() == logits.argmax(1).tolist() == [[[2, 1, 0]]]


def _stub_old_model(logits: torch.Tensor) -> BiSeNet:
    """An old model whose embedding is the input and whose head returns ``logits`` (B, C, H, W)."""
    return stub_model(forward_features=lambda images: images, forward_head=lambda features, size: logits)


def test_the_step_counts_what_the_old_model_sees_at_its_threshold() -> None:
    # one batch, 1 x 4 positions: labels bg, bg, bg, new class 3; old logits of classes 1 and 2
    old_logits = torch.tensor([[[[0.0] * 4], [[0.3, 0.7, -1.0, 2.0]], [[0.4, 0.6, -2.0, 0.0]]]])
    labels = torch.tensor([[[0, 0, 0, 3]]])
    images = torch.zeros(1, 3, 1, 4)
    memory = ClassMemory(
        torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2), torch.tensor([8.0, 6, 6])
    )
    model = BiSeNet(BiSeNetConfig(4, "resnet10", 8, 8, sigmoid_outputs=True), aux=False)
    loader = DataLoader(TensorDataset(images, labels), batch_size=1)  # the one batch
    ctx = StepContext(1, model, _stub_old_model(old_logits), 3, [], loader, torch.device("cpu"))
    found = {}
    for threshold in (0.0, 0.5):
        term = StarClassification(old_logit_threshold=threshold, max_replay_ratio=None)
        term.memory = memory
        term._plan_replay(ctx)
        assert term.found is not None
        found[threshold] = term.found.tolist()
    assert found[0.0] == [1, 1, 1]  # positions 0 -> class 2, 1 -> class 1, 2 -> background
    assert found[0.5] == [2, 1, 0]  # position 0's 0.4 is below 0.5: background for STAR's trainer
    # overlapped, one new class, one iteration: 8 * 0.99 / 2 - 0.5; deficits 6 - 1, 6 - 0
    assert term.background_ratio == pytest.approx(8 * 0.99 / 2 - 0.5)
    assert term.fakes_per_iteration is not None
    assert term.fakes_per_iteration.tolist() == [5, 6]


def test_new_rows_copy_the_auxiliary_row_or_start_from_kaiming_noise() -> None:
    torch.manual_seed(0)
    old = BiSeNet(BiSeNetConfig(3, "resnet10", 8, 8, sigmoid_outputs=True), aux=False)
    grown = copy.deepcopy(old)
    grown.add_classes(2)  # MiB's initialisation rewrites the bias of row 0
    init_new_rows(grown, old, aux_init=True)  # DKD model.py:110-115
    weight, bias = grown.head.classifier.weight.detach(), bias_of(grown.head.classifier).detach()
    assert torch.equal(weight[:3], old.head.classifier.weight) and torch.equal(
        bias[:3], bias_of(old.head.classifier)
    )
    assert torch.equal(weight[3:], old.head.classifier.weight[:1].expand(2, -1, -1, -1))
    assert torch.equal(bias[3:], bias_of(old.head.classifier)[:1].expand(2))
    wide = torch.nn.Conv2d(400, 1 + 300, 1)  # STAR model.py:85-92 on 120000 weights
    kept = wide.weight[:1].detach().clone()
    kaiming_rows(wide, 1)
    assert torch.equal(wide.weight[:1], kept)
    assert wide.weight[1:].std().item() == pytest.approx(
        math.sqrt(2 / 400), rel=0.02
    )  # PyTorch's default: 0.029
    assert wide.weight[1:].mean().item() == pytest.approx(0.0, abs=1e-3)
    assert bias_of(wide)[1:].abs().max().item() <= 1 / math.sqrt(400)


def test_auxiliary_classifier_against_dkd() -> None:
    model = BiSeNet(BiSeNetConfig(3, "resnet10", 8, 8, sigmoid_outputs=True), aux=False)
    features = torch.randn(2, 8, 3, 4, requires_grad=True)
    unread_logits = torch.full((2, 3, 3, 4), math.nan)  # the term reads the features only
    batch = Batch(
        torch.zeros(2, 3, 3, 4),
        torch.zeros(2, 3, 4).long(),
        SegmentationOutput(unread_logits, features, []),
        None,
    )
    ctx = StepContext(0, model, None, 0, [], NO_DATA, torch.device("cpu"))
    loss = AuxiliaryClassifier()(batch, ctx)
    row0 = model.head.classifier(features)[:, :1]  # DKD model.py:71, row 0 on detached features
    # DKD loss.py:110-119: BCE with target 0, mean over positions (trainer_voc.py:360)
    expected = F.binary_cross_entropy_with_logits(row0, torch.zeros_like(row0))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert features.grad is None  # shapes nothing but row 0
    weight_grad = model.head.classifier.weight.grad
    assert weight_grad is not None
    assert weight_grad[1:].abs().sum() == 0 and weight_grad[0].abs().sum() > 0


def _per_element_sample(memory: ClassMemory, n: int, gen: torch.Generator) -> torch.Tensor:
    """STAR trainer_voc.py:408-417: a norm drawn for every element, not every vector."""
    directions = memory.prototypes[0] + memory.noise[0] * torch.randn(
        n, memory.prototypes.shape[1], generator=gen
    )
    return directions * (
        memory.norm_mean[0] + memory.norm_std[0] * torch.randn(directions.shape, generator=gen)
    )


def test_fake_features_draw_one_norm_per_vector() -> None:
    # x_i = (p_i + s e_i) r with one r per vector: cov(x_0, x_1) = p_0 p_1 var(r) = 0.5, var(x_i) =
    # (p_i^2 + s^2) E[r^2] - p_i^2 E[r]^2 = 0.51 * 26 - 0.5 * 25 = 0.76: correlation 0.66. With a norm
    # per element (STAR's code) the two elements are independent: correlation 0.
    unit = 1 / math.sqrt(2)
    memory = ClassMemory(
        torch.tensor([[unit, unit]]),
        torch.tensor([[0.1, 0.1]]),
        torch.tensor([5.0]),
        torch.tensor([1.0]),
        torch.tensor([0.0, 1.0]),
    )
    n = 20000
    ours = memory.sample(torch.tensor([n]), torch.Generator().manual_seed(0))
    per_element = _per_element_sample(memory, n, torch.Generator().manual_seed(0))
    assert torch.corrcoef(ours.T)[0, 1].item() == pytest.approx(0.5 / 0.76, abs=0.03)
    assert abs(torch.corrcoef(per_element.T)[0, 1].item()) < 0.03  # the test tells the variants apart
    assert ours.mean(0).tolist() == pytest.approx([5 * unit] * 2, abs=0.05)


def test_star_reference_is_stars_code_on_our_model() -> None:
    method = build_method("star_reference")
    assert method.name == "star_reference" and method.needs_own_base and method.freeze_batchnorm
    assert sigmoid_family("star_reference")
    assert [t.name for t in method.terms] == ["bce", "old_region_mse", "sad"]  # no auxiliary classifier
    bce, mse, sad = method.terms
    assert isinstance(bce, StarClassification) and isinstance(mse, OldRegionFeatures)
    assert (mse.weight, sad.weight, bce.pos_weight) == (5.0, 0.05, 4.0)  # config_voc.json
    assert bce.lr_multipliers[ParamGroup.NEW_CLASSES] == 10.0  # 1e-2 at our 1e-3 (train_voc.py:133)
    assert bce.max_replay_weight is None and bce.max_replay_ratio is None and not bce.aux_init
    assert bce.old_logit_threshold == mse.old_logit_threshold == 0.5  # trainer_voc.py:399, 514
    shipped = build_method("star").terms
    shipped_bce, shipped_mse = shipped[0], shipped[2]
    assert isinstance(shipped_bce, StarClassification) and isinstance(shipped_mse, OldRegionFeatures)
    assert shipped_bce.old_logit_threshold == shipped_mse.old_logit_threshold == 0.0


def test_star_reference_and_disjoint_run_tiny_steps() -> None:
    options = TINY_OPTIONS.model_copy(update={"epochs": 2, "min_iterations": 0})
    method = build_method("star_reference")
    base, _ = train_step(None, ["a", "b"], TinySet([1, 2], n=4), None, method, options)
    assert method.terms[0].lr_multipliers[ParamGroup.SPATIAL_PATH] == 1.0  # step 0: with the heads
    for setting, formulas in (("disjoint", DISJOINT_FORMULAS), ("overlapped", OVERLAPPED_FORMULAS)):
        method = build_method("star_reference")
        step_options = options.model_copy(
            update={"setting": setting, "lr_multipliers": {"spatial_path": 0.5}}
        )
        grown, _ = train_step(base, ["c"], TinySet([3], n=4), None, method, step_options)
        term = method.terms[0]
        assert isinstance(term, StarClassification)
        assert term.formulas is formulas
        assert term.memory is not None and term.found is not None and term.plan is not None
        expected = merged_counts(
            term.memory.counts, term.found, grown.state[STAR_MEMORY]["counts"][[0, 3]], term.plan, formulas
        )
        assert torch.allclose(grown.state[STAR_MEMORY]["counts"], expected)
        assert grown.history[-1]["learning_rates"]["spatial_path"] == pytest.approx(0.001 * 0.5)
        assert grown.history[-1]["learning_rates"]["new_classes"] == pytest.approx(0.001 * 10)


def test_old_region_and_background_repetition_use_the_threshold() -> None:
    ctx, batch = _replay_context()
    # old logits at the two positions: class 1 at 0.3 / -1.0; position 0 is labelled 3, position 1 background
    features = batch.out.features
    old_features = torch.zeros_like(features)
    batch.old_out = SegmentationOutput(
        torch.tensor([[[[0.0, 0.0]], [[1.0, 0.3]], [[-1.0, -1.0]]]]), old_features, []
    )
    mse = {t: OldRegionFeatures(1.0, t)(batch, ctx).item() for t in (0.0, 0.5)}
    region = torch.tensor([[[[0.0, 1.0]]]])  # logit 0.3 > 0: the old model sees class 1 at position 1
    assert mse[0.0] == pytest.approx(old_region_mse(features, old_features, region).item())
    assert mse[0.5] == 0.0  # 0.3 < 0.5: background for STAR's trainer, no old region
    losses = {}
    for threshold in (0.0, 0.5):
        term = StarClassification(replay=False, max_replay_weight=None, old_logit_threshold=threshold)
        term.background_ratio = 1.5
        losses[threshold] = term(batch, ctx).item()
    z = [0.5 * 1 - 0.5 * 2 + 0.3, 0.5 * -1 - 0.5 * 0.5 + 0.3]  # the new class's logits at both positions
    real = (_bce(z[0], 1, 4.0) + _bce(z[1], 0)) / 2
    assert losses[0.0] == pytest.approx(real, abs=1e-5)  # no position is background for both
    w_bg = 1.5 * 1 / 2  # at 0.5, position 1 is repeated
    assert losses[0.5] == pytest.approx((real + w_bg * _bce(z[1], 0)) / (1 + w_bg), abs=1e-5)
