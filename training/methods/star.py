"""STAR: prototype replay on DKD's per-class sigmoids (Chen et al., NeurIPS 2023; Baek et al., NeurIPS 2022).

References read line by line: jinpeng0528/STAR @9e31f36 (``trainer/trainer_voc.py``, ``models/loss.py``,
``models/model.py``, ``base/base_trainer.py``, ``train_voc.py``, ``configs/config_voc.json``) and
cvlab-yonsei/DKD (same layout). "STAR x:n" / "DKD x:n" below cite those files.

DKD's framework:
- One sigmoid per class and binary cross-entropy, no softmax over a background class; a pixel is
  background where no class passes 0.5 (STAR trainer_voc.py:182-186). The model runs with
  ``BiSeNetConfig.sigmoid_outputs``: its classifier row 0 is DKD's auxiliary classifier
  (DKD model.py:41, trained to say "no" everywhere on detached features, DKD loss.py:110-119,
  weight ``ac`` = 1, DKD config_voc.json) and its outputs carry a constant 0 in channel 0, so the
  argmax of any exported graph is the papers' label map.
- New classes' rows start as copies of that auxiliary row (DKD model.py:110-115): they answer "no"
  everywhere at first instead of 0.5 (STAR itself starts them with Kaiming noise, STAR
  train_voc.py:118; ``aux_init=False`` does that).
- BatchNorm frozen in incremental steps (``--freeze_bn``, STAR model.py:94-125).
- KD on the old logits in BCE form (DKD trainer_voc.py:354-357, weight 5): off by default, as in
  STAR, whose trainer has no such term; ``star(kd=5)`` adds it.
- Learning rates per group, STAR train_voc.py:123-142: backbone x1, head x10, old rows x10,
  new rows x100 of a base rate 1e-4 (1e-3 at step 0, where the classifier is x10), except the new
  rows, **ten times faster here** (deviation, for steps of 100 iterations: see ``LR_MULTIPLIERS``,
  stated on the classification term, applied by ``training.optim``). In incremental steps BiSeNet's
  spatial path (three stride-2 convolutions reading the image: a feature extractor, as STAR's
  backbone) trains at the backbone's rate, not the heads' (``training.optim``
  puts it with the heads): at the heads' 1e-3 the old-region MSE's rate-scaled Hessian has a top
  eigenvalue past the stability limit of SGD with Nesterov momentum 0.9 (1.36), 2.0 of it from the
  spatial path alone, and that loss then diverges instead of holding the old features (measured,
  BENCHMARKS.md "STAR: why it collapsed at its first step").

STAR's replay (STAR trainer_voc.py:390-465), with its weights (config_voc.json):
- BCE on the new classes with ``pos_weight`` 4 (mbce 1), averaged over all pixels per class and
  summed over classes (STAR loss.py:58-91, trainer_voc.py:431-434).
- Fake features of the old classes, drawn from the stored statistics (``star_memory``), go through
  the classifier and must not be claimed by the new classes (BCE with target 0 on the new
  classes' logits); as many per iteration as the old class lacks in the current data
  (its stored count minus what the old model finds here, spread over the iterations).
- Background repetition: the current features at positions that are background for both the
  labels and the old model are classified again with target 0, weighted so that the background
  keeps its share of the old steps.
- The three parts are one loss: (real + w_fake fake + w_bg bg) / (1 + w_fake + w_bg), with
  w = (number of replayed vectors) / (feature positions in the batch) (trainer_voc.py:450-455).
  **Deviation**: w_fake + w_bg is capped at 1 (``max_replay_weight``; None restores the reference).
  The reference's weights give the old data its share of the positions, which after a large step 0
  and a small step is about 6 times the real pixels (5.5 background, 0.7 fake); STAR trains such a
  step for about 1250 iterations from ImageNet features. In our short steps (the trainer's floor of
  100 iterations) they hold the new classes down: measured on the synthetic protocols of
  BENCHMARKS.md (96 px, two data seeds), the new-class mIoU is 0.32-0.55 of joint training's with
  them and 0.68-0.83 capped at 1, while the old classes keep most of what the replay saves (cap 1
  chosen among 0.5, 1 and 2 on 10-2 overlapped; 10x the iterations without the cap still left the
  probe's new class at 8.5 IoU). With the new rows' faster rate as well, the cap still adds 4.6
  points of all-mIoU on 10-2 overlapped seed 0 (66.6 against 62.0).
- Old-class regions (label background, old model says an old class) keep their features: MSE
  between the new and old embedding there, weight ``pkd`` 5 (STAR loss.py:94-107).
- SAD: the new classes' mean features are pushed away from the nearest old prototype,
  1 / distance, weight ``cont`` 0.05 (STAR loss.py:110-133).

Step 0 is star's own, trained with per-class BCE as STAR and DKD train theirs (``needs_own_base``:
``incseg bench`` trains it instead of sharing the softmax ``ft`` base; on the 15-1 probe of
BENCHMARKS.md it scores 60.5 against the ``ft`` base's 56.8). A softmax base is refused rather than
converted: the conversion (class-vs-background log-odds as the class logits) is exact for the label
map, but it is the path on which star collapsed (all old classes to 0) before the spatial path got
the backbone's rate, and a base trained with BCE is the reference's. A base with no star memory is
refused as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from training.methods.base import Batch, LossTerm, Method, StepContext
from training.methods.star_memory import STAR_MEMORY, ClassMemory, MemoryBuilder, labels_at
from training.models.bisenet import BiSeNet, bias_of
from training.optim import ParamGroup

# STAR train_voc.py:123-142 and scripts/voc/overlapped/train_voc_15-1.sh: base lr 1e-3 at step 0,
# 1e-4 later; ASPP and classifier x10, new classifier x100. Our step lr is 0.01 at step 0 and 0.001
# later (the ASPP's rate), so the same multipliers give STAR's rates at every step, except the new
# rows: x100 here (1e-1), ten times STAR's 1e-2 (deviation: STAR trains a step for about 1250
# iterations, ours run from the trainer's floor of 100; at 1e-2 the new rows, which start from the
# auxiliary row's "no", barely leave it: measured in BENCHMARKS.md "Why star caps its replay and
# trains its new rows faster"; x100 is also what the trainer gives the softmax methods' new rows).
LR_MULTIPLIERS: dict[ParamGroup, float] = {
    ParamGroup.BACKBONE: 0.1,
    ParamGroup.HEAD: 1.0,
    ParamGroup.CLASSIFIER: 1.0,
    ParamGroup.NEW_CLASSES: 100.0,
}


def one_hot_targets(labels: Tensor, first: int, num_classes: int) -> Tensor:
    """Binary targets of classes ``first..num_classes-1``: (B, H, W) -> (B, num_classes - first, H, W).

    Background, ignored (255) and classes below ``first`` are 0 for every class, as in STAR
    loss.py:72-79 (the ignored label is a negative there, not a hole).
    """
    classes = torch.arange(first, num_classes, device=labels.device)
    return (labels[:, None] == classes[None, :, None, None]).float()


def class_bce(logits: Tensor, labels: Tensor, first: int, pos_weight: float) -> Tensor:
    """BCE with ``pos_weight`` on the logits of classes ``first..``, mean over all pixels: -> (C - first,).

    Args:
        logits: (B, C, H, W) raw class logits.
        labels: (B, H, W) model indices, 255 = ignore.
        first: First class trained (1 at step 0, the number of old classes later).
        pos_weight: Weight of the positive term (STAR 4).
    """
    trained = logits[:, first:]
    targets = one_hot_targets(labels, first, logits.shape[1])
    weight = torch.full((trained.shape[1], 1, 1), pos_weight, device=logits.device, dtype=logits.dtype)
    loss = F.binary_cross_entropy_with_logits(trained, targets, pos_weight=weight, reduction="none")
    return loss.mean(dim=(0, 2, 3))


def negative_bce(logits: Tensor) -> Tensor:
    """BCE with target 0 for every row: (N, C') -> (C',), mean over rows (0 for no row)."""
    if len(logits) == 0:
        return logits.sum(0)
    return F.softplus(logits).mean(0)


def sigmoid_distillation(logits: Tensor, old_logits: Tensor, num_old: int) -> Tensor:
    """DKD's KD (trainer_voc.py:354-357): BCE of new logits against old sigmoids, classes 1..num_old-1.

    Mean over pixels, sum over classes. logits (B, C, H, W), old_logits (B, num_old, H, W) -> scalar.
    """
    new, old = logits[:, 1:num_old], old_logits[:, 1:num_old].sigmoid()
    return F.binary_cross_entropy_with_logits(new, old, reduction="none").mean(dim=(0, 2, 3)).sum()


def old_region_mse(features: Tensor, old_features: Tensor, region: Tensor) -> Tensor:
    """STAR's PKD (loss.py:94-107): MSE of the embeddings in old-class regions.

    Args:
        features: (B, D, h, w) current embedding.
        old_features: (B, D, h, w) old model's embedding.
        region: (B, 1, H, W) 1 where the label is background and the old model sees an old class.

    Returns:
        sum(mse * region_small) / (sum(region_small) * D), 0 where the region is empty (the
        reference divides by 0 there).
    """
    small = F.interpolate(region, size=features.shape[2:], mode="bilinear", align_corners=False)
    area = small.sum()
    if area == 0:
        return features.sum() * 0
    return ((features - old_features) ** 2 * small).sum() / (area * features.shape[1])


def prototype_separation(
    features: Tensor, labels: Tensor, first: int, num_classes: int, prototypes: Tensor
) -> Tensor:
    """STAR's SAD (loss.py:110-133): mean over new classes of 1 / (distance to the nearest old prototype).

    Args:
        features: (B, D, h, w) current embedding.
        labels: (B, H, W) model indices.
        first: First new class.
        num_classes: Classes of the model.
        prototypes: (K_old, D) old classes' prototypes.

    A new class absent from the batch has a zero centre (distance 1 to every unit prototype), as in
    the reference.
    """
    targets = one_hot_targets(labels, first, num_classes)  # (B, C_new, H, W)
    small = F.interpolate(targets, size=features.shape[2:], mode="bilinear", align_corners=False)
    unit = F.normalize(features, dim=1)  # (B, D, h, w)
    centres = F.normalize(torch.einsum("bchw,bdhw->cd", small, unit), dim=1)  # (C_new, D)
    distances = torch.cdist(centres, prototypes)  # (C_new, K_old)
    return (1 / distances.min(dim=1).values).mean()


def _feature_positions(labels: Tensor, size: tuple[int, ...]) -> Tensor:
    return labels_at(labels, size)


class StarClassification(LossTerm):
    """STAR's classification loss: per-class BCE, plus fake old features and background repetition.

    At step 0 every class is trained (main and auxiliary heads, as BiSeNet trains); later only the
    new classes on the main head, whose embedding the replay lives in. The step hooks set the model
    up (sigmoid outputs, new rows), count what the old model sees in the new data, and build the
    new classes' memory at the end.

    Args:
        pos_weight: Weight of positive pixels (STAR 4).
        replay: Mix fake old-class features in (STAR).
        background_repeat: Repeat background features (STAR). Both are on, as in STAR; at the
            reference's weights a 100-iteration step learns its class weakly (the repeated background
            weighs about 5.5x the real pixels, BENCHMARKS.md "STAR: why it collapsed at its first
            step"), hence ``max_replay_weight``.
        aux_init: New rows copy the auxiliary row (DKD); False = Kaiming noise (STAR).
        max_replay_ratio: At most this many fake vectors per feature position of a batch. The
            reference replays a class's whole deficit every epoch, which on a small step after a
            large one means huge batches of fake features; STAR on VOC 15-1 has about 3 per
            position, so 4 keeps its behaviour and bounds a step's cost whatever the history.
        max_replay_weight: At most this weight for the fake features and the repeated background
            together, against 1 for the real pixels (both scaled down alike past it); None: the
            reference's weights, however large (see the module's docstring for why 1).
        lr_multipliers: Overrides of ``LR_MULTIPLIERS`` by group name, e.g. ``{"new_classes": 100}``.
        spatial_path_at_backbone_rate: In incremental steps, scale the spatial path's gradient by
            the backbone / head ratio of these multipliers (a gradient hook, as the trainer scales
            the new rows; the step's recorded rates list it with the heads). False: the heads' rate.
    """

    name = "bce"
    classifies = True
    needs_own_base = True
    lr_multipliers = LR_MULTIPLIERS

    def __init__(
        self,
        pos_weight: float = 4.0,
        replay: bool = True,
        background_repeat: bool = True,
        aux_init: bool = True,
        max_replay_ratio: float = 4.0,
        max_replay_weight: float | None = 1.0,
        lr_multipliers: Mapping[str, float] | None = None,
        spatial_path_at_backbone_rate: bool = True,
    ) -> None:
        super().__init__(1.0)
        self.lr_multipliers = {
            **LR_MULTIPLIERS,
            **{ParamGroup(k): v for k, v in (lr_multipliers or {}).items()},
        }
        self.pos_weight = pos_weight
        self.replay = replay
        self.background_repeat = background_repeat
        self.aux_init = aux_init
        self.max_replay_ratio = max_replay_ratio
        self.max_replay_weight = max_replay_weight
        self.spatial_path_at_backbone_rate = spatial_path_at_backbone_rate
        self.gradient_hooks: list[RemovableHandle] = []
        self.memory: ClassMemory | None = None
        self.fakes_per_iteration: Tensor | None = None
        self.background_ratio = 0.0
        self.background_seen = 0.0
        self.previous_background = 0.0

    # ----- step hooks -------------------------------------------------------------------------
    def on_step_start(self, ctx: StepContext) -> None:
        self.memory, self.fakes_per_iteration, self.background_ratio = None, None, 0.0
        if ctx.old_model is None:
            ctx.model.config = dataclasses.replace(ctx.model.config, sigmoid_outputs=True)
            return
        init_new_rows(ctx.model, ctx.old_model, self.aux_init)
        if self.spatial_path_at_backbone_rate:
            factor = self.lr_multipliers[ParamGroup.BACKBONE] / self.lr_multipliers[ParamGroup.HEAD]
            self.gradient_hooks = scale_gradients(ctx.model.spatial_path.parameters(), factor)
        if STAR_MEMORY not in ctx.state:
            raise ValueError(
                "star needs the prototype statistics of the old classes: train the base model with "
                "star (or a method whose end-of-step hook ran star's)"
            )
        self.memory = ClassMemory.from_state(ctx.state[STAR_MEMORY], ctx.device)
        if self.memory.num_classes != ctx.num_old_classes - 1:
            raise ValueError(
                f"star memory holds {self.memory.num_classes} classes, the base model "
                f"{ctx.num_old_classes - 1}"
            )
        self._plan_replay(ctx, ctx.old_model, self.memory)

    @torch.no_grad()
    def _plan_replay(self, ctx: StepContext, old_model: BiSeNet, memory: ClassMemory) -> None:
        """STAR trainer_voc.py:362-378 and 502-527 (overlapped formulas, used for every setting)."""
        found = torch.zeros(ctx.num_old_classes, device=ctx.device)  # [0] = background for both
        positions_per_batch = 0
        for images, labels in ctx.train_loader:
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            features = old_model.forward_features(images)
            size = features.shape[2:]
            old_pred = _feature_positions(old_model.forward_head(features, images.shape[2:]).argmax(1), size)
            small = _feature_positions(labels, size)
            found += torch.bincount(old_pred[small == 0], minlength=ctx.num_old_classes).float()
            positions_per_batch = max(positions_per_batch, small.numel())
        counts = memory.counts
        n_new = ctx.num_classes - ctx.num_old_classes
        previous_background = counts[0] * (1 - 0.01 * n_new)
        self.background_seen = float(found[0])
        self.background_ratio = max(float(previous_background / found[0]) - 0.5, 0.0) if found[0] > 0 else 0.0
        deficit = (counts[1:] - found[1:]).clamp_min(0)
        per_iteration = (deficit / max(len(ctx.train_loader), 1)).floor()
        cap = self.max_replay_ratio * positions_per_batch
        if per_iteration.sum() > cap:
            per_iteration = (per_iteration * cap / per_iteration.sum()).floor()
        self.fakes_per_iteration = per_iteration.long()
        self.previous_background = float(previous_background)

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        """Adds the new classes' statistics to the memory (STAR base_trainer.py:117-122)."""
        for hook in self.gradient_hooks:
            hook.remove()
        self.gradient_hooks = []
        first = max(ctx.num_old_classes, 1)
        builder = MemoryBuilder(list(range(first, ctx.num_classes)), ctx.model.embed_dim, ctx.device)
        was_training = ctx.model.training
        ctx.model.eval()
        for images, labels in ctx.train_loader:
            builder.update(ctx.model.forward_features(images.to(ctx.device)), labels.to(ctx.device))
        ctx.model.train(was_training)
        new = builder.build()
        if ctx.old_model is None or self.memory is None:
            memory = new
        else:
            # STAR trainer_voc.py:380-388: background = half of what the step saw + the old share
            background = 0.5 * self.background_seen + self.previous_background
            old = self.memory
            memory = ClassMemory(
                torch.cat([old.prototypes, new.prototypes]),
                torch.cat([old.noise, new.noise]),
                torch.cat([old.norm_mean, new.norm_mean]),
                torch.cat([old.norm_std, new.norm_std]),
                torch.cat([torch.tensor([background], device=ctx.device), old.counts[1:], new.counts[1:]]),
            )
        ctx.state[STAR_MEMORY] = memory.to_state()

    # ----- the loss ---------------------------------------------------------------------------
    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        if ctx.old_model is None:
            heads = [batch.out.logits, *batch.out.aux_logits]
            return torch.stack([class_bce(h, batch.labels, 1, self.pos_weight).sum() for h in heads]).sum()
        first = ctx.num_old_classes
        real = class_bce(batch.out.logits, batch.labels, first, self.pos_weight)  # (C_new,)
        features = batch.out.features  # (B, D, h, w)
        positions = features.shape[0] * features.shape[2] * features.shape[3]
        classifier = ctx.model.head.classifier
        weight = classifier.weight.flatten(1)  # (C, D)
        parts, weights = [real], [1.0]
        if (
            self.replay
            and self.memory is not None
            and self.fakes_per_iteration is not None
            and self.fakes_per_iteration.sum() > 0
        ):
            fakes = self.memory.sample(self.fakes_per_iteration)  # (N, D)
            parts.append(negative_bce(F.linear(fakes, weight, classifier.bias)[:, first:]))
            weights.append(len(fakes) / positions)
        if self.background_repeat and self.background_ratio > 0:
            size = features.shape[2:]
            old_pred = _feature_positions(batch.require_old_out().logits.argmax(1), size)
            background = (old_pred == 0) & (_feature_positions(batch.labels, size) == 0)  # (B, h, w)
            repeated = features.permute(0, 2, 3, 1)[background]  # (M, D)
            parts.append(negative_bce(F.linear(repeated, weight, classifier.bias)[:, first:]))
            weights.append(self.background_ratio * len(repeated) / positions)
        replayed = sum(weights[1:])
        if self.max_replay_weight is not None and replayed > self.max_replay_weight:
            weights[1:] = [w * self.max_replay_weight / replayed for w in weights[1:]]
        total = sum((w * p for w, p in zip(weights, parts, strict=True)), torch.zeros_like(real))
        return (total / sum(weights)).sum()


class AuxiliaryClassifier(LossTerm):
    """DKD's auxiliary classifier (loss.py:110-119, model.py:67-75): row 0 learns to say "no" everywhere.

    Trained on detached features, so it shapes nothing but itself; new classes' rows start from it.
    Averaged over the feature positions (DKD averages its upsampled logits: the same mean).
    """

    name = "aux_classifier"

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        classifier = ctx.model.head.classifier
        logits = F.conv2d(batch.out.features.detach(), classifier.weight[:1], bias_of(classifier)[:1])
        return F.softplus(logits).mean()


class SigmoidDistillation(LossTerm):
    """DKD's KD on the old classes' sigmoids (see ``sigmoid_distillation``)."""

    name = "kd"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        return sigmoid_distillation(batch.out.logits, batch.require_old_out().logits, ctx.num_old_classes)


class OldRegionFeatures(LossTerm):
    """STAR's PKD: old-class regions keep the old model's embedding (see ``old_region_mse``).

    The region uses the old model's label map (sigmoid 0.5, i.e. logit 0); the reference thresholds
    the raw old logits at 0.5 there (trainer_voc.py:398-401, sigmoid 0.62), unlike its own
    evaluation; one rule for both is kept here.
    """

    name = "old_region_mse"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        old_pred = batch.require_old_out().logits.argmax(1)  # (B, H, W); channel 0 is the constant threshold
        region = ((batch.labels == 0) & (old_pred > 0)).unsqueeze(1).float()
        return old_region_mse(batch.out.features, batch.require_old_out().features, region)


class PrototypeSeparation(LossTerm):
    """STAR's SAD (see ``prototype_separation``); the prototypes come from the step's memory."""

    name = "sad"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        prototypes = ctx.state[STAR_MEMORY]["prototypes"].to(batch.out.features)
        prototypes = prototypes[prototypes.norm(dim=1) > 0]  # a class that had no pixel has none
        if len(prototypes) == 0:
            return batch.out.features.sum() * 0
        return prototype_separation(
            batch.out.features, batch.labels, ctx.num_old_classes, ctx.num_classes, prototypes
        )


def scale_gradients(parameters: Iterable[nn.Parameter], factor: float) -> list[RemovableHandle]:
    """Multiplies the gradient of each trained parameter by ``factor`` (with SGD: its learning rate).

    Parameters that do not require a gradient (e.g. BatchNorm frozen by an earlier step) are skipped;
    no hooks for a factor of 1.
    """
    if factor == 1.0:
        return []
    return [p.register_hook(lambda grad: grad * factor) for p in parameters if p.requires_grad]


@torch.no_grad()
def init_new_rows(model: BiSeNet, old_model: BiSeNet, aux_init: bool) -> None:
    """Old rows from the teacher (undoing ``add_classes``' MiB rewrite of row 0), new rows as DKD or STAR."""
    classifier, old = model.head.classifier, old_model.head.classifier
    bias, old_bias = bias_of(classifier), bias_of(old)
    num_old = old.out_channels
    classifier.weight[:num_old] = old.weight
    bias[:num_old] = old_bias
    if aux_init:  # DKD model.py:110-115
        classifier.weight[num_old:] = old.weight[:1]
        bias[num_old:] = old_bias[:1]
    else:  # STAR model.py:85-92: Kaiming normal weights, PyTorch's default bias
        fresh = nn.Conv2d(classifier.in_channels, classifier.out_channels - num_old, 1).to(classifier.weight)
        nn.init.kaiming_normal_(fresh.weight)
        classifier.weight[num_old:] = fresh.weight
        bias[num_old:] = bias_of(fresh)


def star(
    pos_weight: float = 4.0,
    old_region_mse: float = 5.0,
    sad: float = 0.05,
    kd: float = 0.0,
    aux_classifier: float = 1.0,
    replay: bool = True,
    background_repeat: bool = True,
    aux_init: bool = True,
    max_replay_ratio: float = 4.0,
    max_replay_weight: float | None = 1.0,
    lr_multipliers: dict[str, float] | None = None,
    spatial_path_at_backbone_rate: bool = True,
) -> Method:
    """STAR on DKD's framework; weights of STAR's configs/config_voc.json (pkd 5, cont 0.05, pos_weight 4).

    A weight of 0 drops the term. ``kd`` is DKD's (5 there); STAR has none.
    """
    terms: list[LossTerm] = [
        StarClassification(
            pos_weight,
            replay,
            background_repeat,
            aux_init,
            max_replay_ratio,
            max_replay_weight,
            lr_multipliers,
            spatial_path_at_backbone_rate,
        )
    ]
    for term, weight in (
        (AuxiliaryClassifier, aux_classifier),
        (SigmoidDistillation, kd),
        (OldRegionFeatures, old_region_mse),
        (PrototypeSeparation, sad),
    ):
        if weight > 0:
            terms.append(term(weight))
    return Method("star", terms, freeze_batchnorm=True)
