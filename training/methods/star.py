"""STAR: prototype replay on DKD's per-class sigmoids (Chen et al., NeurIPS 2023; Baek et al., NeurIPS 2022).

References read line by line: jinpeng0528/STAR @9e31f36 (``trainer/trainer_voc.py``, ``models/loss.py``,
``models/model.py``, ``base/base_trainer.py``, ``train_voc.py``, ``configs/config_voc.json``) and
cvlab-yonsei/DKD (same layout). "STAR x:n" / "DKD x:n" below cite those files. ``star`` ships with
a few deviations for short steps (each below, with its option); ``star_reference`` is STAR's code.

DKD's framework:
- One sigmoid per class and binary cross-entropy, no softmax over a background class; a pixel is
  background where no class passes 0.5 (STAR trainer_voc.py:182-186). The model runs with
  ``BiSeNetConfig.sigmoid_outputs``: its classifier row 0 is DKD's auxiliary classifier
  (DKD model.py:41, trained to say "no" everywhere on detached features, DKD loss.py:110-119,
  weight ``ac`` = 1, DKD config_voc.json) and its outputs carry a constant 0 in channel 0, so the
  argmax of any exported graph is the papers' label map. STAR has no such row (STAR model.py:41,
  task.py:211); with ``aux_classifier=0`` and ``aux_init=False`` nothing reads row 0.
- New classes' rows start as copies of that auxiliary row (DKD model.py:110-115), so they answer
  "no" everywhere at first; STAR starts them with Kaiming noise (STAR model.py:85-92,
  ``aux_init=False``).
- BatchNorm frozen in incremental steps (``--freeze_bn``, STAR model.py:94-125).
- KD on the old logits in BCE form (DKD trainer_voc.py:354-357, weight 5): off by default, as in
  STAR, whose trainer has no such term; ``star(kd=5)`` adds it.
- Learning rates per group, STAR train_voc.py:123-142: backbone x1, head x10, old rows x10,
  new rows x100 of a base rate 1e-4 (1e-3 at step 0, where the classifier is x10); ``star`` trains
  the new rows ten times faster (see ``LR_MULTIPLIERS``). BiSeNet's spatial path reads the image as
  STAR's backbone does, so in incremental steps it trains at the backbone's rate (its own
  ``spatial_path`` group of ``training.optim``): at the heads' rate the old-region MSE diverged
  (BENCHMARKS.md "STAR: why it collapsed at its first step, and the fix").

STAR's replay (STAR trainer_voc.py:362-465), with its weights (config_voc.json):
- BCE on the new classes with ``pos_weight`` 4 (mbce 1), averaged over all pixels per class and
  summed over classes (STAR loss.py:58-91, trainer_voc.py:431-434).
- Fake features of the old classes, drawn from the stored statistics (``star_memory``), go through
  the classifier and must not be claimed by the new classes (BCE with target 0 on the new
  classes' logits); per iteration, a class's stored count (overlapped: minus what the old model
  finds in the current data) spread over the iterations.
- Background repetition: the current features at positions that are background for both the
  labels and the old model are classified again with target 0, weighted so that the background
  keeps its share of the old steps.
- The three parts are one loss: (real + w_fake fake + w_bg bg) / (1 + w_fake + w_bg), with
  w = (number of replayed vectors) / (feature positions in the batch) (trainer_voc.py:450-455).
  ``star`` caps w_fake + w_bg at 1 (``max_replay_weight``; None: the reference's weights), because
  at the reference's weights a short step after a large step 0 barely learns its classes
  (BENCHMARKS.md "Why star caps its replay and trains its new rows faster").
- The disjoint setting has its own formulas (trainer_voc.py:327-330, 364-385): ``SETTING_FORMULAS``.
  ``mean_over_replayed=False, max_replay_weight=None`` keeps the reference's weights and divides by
  the real positions only (measured against the cap in BENCHMARKS.md, "star on data it was not tuned on").
- Old-class regions (label background, old model says an old class) keep their features: MSE
  between the new and old embedding there, weight ``pkd`` 5 (STAR loss.py:94-107).
- SAD: the new classes' mean features are pushed away from the nearest old prototype,
  1 / distance, weight ``cont`` 0.05 (STAR loss.py:110-133).
- Where the old model sees an old class (the MSE's region, the background repetition, the counts)
  STAR's trainer thresholds the raw old logits at 0.5 (trainer_voc.py:399, 514), i.e. sigmoid 0.62,
  where its evaluation thresholds the sigmoid (182-186): the evaluation's rule without its sigmoid.
  ``star`` keeps one rule, the model's own label map (logit 0, the rule every exported graph
  applies), so that "the old model sees class c" means what the old model predicts;
  ``old_logit_threshold=0.5`` is the reference's.

Step 0 is star's own, trained with per-class BCE as STAR and DKD train theirs (``needs_own_base``:
``incseg bench`` trains it instead of sharing the softmax ``ft`` base; BENCHMARKS.md "STAR: why it
collapsed at its first step, and the fix"). A softmax base is refused rather than converted: a base
trained with BCE is the reference's. A base with no star memory is refused as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.methods.base import Batch, LossTerm, Method, StepContext
from training.methods.star_memory import STAR_MEMORY, ClassMemory, MemoryBuilder, labels_at
from training.models.bisenet import BiSeNet, bias_of
from training.optim import ParamGroup
from training.protocols import Setting

# STAR train_voc.py:123-142 and scripts/voc/overlapped/train_voc_15-1.sh: base lr 1e-3 at step 0,
# 1e-4 later; ASPP and classifier x10, new classifier x100. Our step lr is 0.01 at step 0 and 0.001
# later (the ASPP's rate), so these multipliers give STAR's rates at every step, except the new rows:
# x100 here (1e-1), ten times STAR's 1e-2, because our steps are far shorter than STAR's and at 1e-2
# the new rows barely leave their initial "no" (BENCHMARKS.md "Why star caps its replay and trains its
# new rows faster"); x100 is also the trainer's rate for the softmax methods' new rows.
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


def old_label_map(logits: Tensor, threshold: float) -> Tensor:
    """The old model's label map with a threshold on its raw class logits: (B, C, H, W) -> (B, H, W).

    The class of the largest logit among channels ``1..``, background (0) where none exceeds
    ``threshold`` (STAR trainer_voc.py:398-401). At 0 this is the argmax of the model's outputs
    (channel 0 is the constant 0); STAR's trainer uses 0.5.
    """
    classes = logits[:, 1:]
    labels = classes.argmax(1) + 1
    return labels.masked_fill((classes > threshold).sum(1) == 0, 0)


@dataclass(frozen=True)
class SettingFormulas:
    """How STAR's trainer weighs the old data in one setting (STAR trainer_voc.py:327-330, 364-385).

    Attributes:
        background_discount_per_new_class: The stored background count shrinks by this fraction per
            new class before it is compared with the step's (328; 330: none).
        background_ratio_offset: Subtracted from stored / seen background to give the repetition
            ratio (374; 376: none).
        found_in_deficit: Weight of the old-class positions the old model finds in the step's data:
            subtracted from the stored count to give the fakes to replay (1: 366) or added to the
            stored count at the end of the step (0: 369 replays the full count, 385 sums them).
        background_seen_share: Share of the background positions seen in the step added to the
            stored background at the end (382; 384: all).
    """

    background_discount_per_new_class: float
    background_ratio_offset: float
    found_in_deficit: float
    background_seen_share: float


OVERLAPPED_FORMULAS = SettingFormulas(0.01, 0.5, 1.0, 0.5)
DISJOINT_FORMULAS = SettingFormulas(0.0, 0.0, 0.0, 1.0)

# The sequential setting takes the disjoint images (``training.protocols``), hence the disjoint
# formulas; its labelled old-class pixels are not background, so they are not counted as found.
SETTING_FORMULAS: dict[Setting, SettingFormulas] = {
    Setting.OVERLAPPED: OVERLAPPED_FORMULAS,
    Setting.DISJOINT: DISJOINT_FORMULAS,
    Setting.SEQUENTIAL: DISJOINT_FORMULAS,
}


@dataclass(frozen=True)
class ReplayPlan:
    """What an incremental step replays (STAR trainer_voc.py:362-378).

    Attributes:
        fakes_per_iteration: (K_old,) fake features of each old foreground class per iteration.
        background_ratio: Weight of each repeated background position.
        previous_background: The stored background count as the step weighs it.
    """

    fakes_per_iteration: Tensor
    background_ratio: float
    previous_background: float


def plan_replay(
    counts: Tensor, found: Tensor, num_new: int, iterations: int, formulas: SettingFormulas
) -> ReplayPlan:
    """STAR's replay plan from the stored counts and what the old model finds in the step's data.

    Args:
        counts: (K_old + 1,) stored feature positions per class, index 0 = background.
        found: (K_old + 1,) positions labelled background in the step's data where the old model
            sees each class (0: background for both).
        num_new: Classes the step adds.
        iterations: Iterations of one epoch (the reference spreads a class's count over one epoch).
        formulas: The setting's coefficients.
    """
    f = formulas
    previous_background = float(counts[0]) * (1 - f.background_discount_per_new_class * num_new)
    seen = float(found[0])
    ratio = max(previous_background / seen - f.background_ratio_offset, 0.0) if seen > 0 else 0.0
    deficit = (counts[1:] - f.found_in_deficit * found[1:]).clamp_min(0)
    per_iteration = (deficit / max(iterations, 1)).floor().long()
    return ReplayPlan(per_iteration, ratio, previous_background)


def capped_fakes(per_iteration: Tensor, cap: float | None) -> Tensor:
    """Scales the fakes of every class down alike (floored) so that their sum is at most ``cap``."""
    total = per_iteration.sum()
    if cap is None or total <= cap:
        return per_iteration
    return (per_iteration * cap / total).floor().long()


def merged_counts(
    counts: Tensor, found: Tensor, new_counts: Tensor, plan: ReplayPlan, formulas: SettingFormulas
) -> Tensor:
    """The counts stored after an incremental step (STAR trainer_voc.py:380-388).

    Args:
        counts: (K_old + 1,) counts stored before the step.
        found: (K_old + 1,) what the old model found in the step's background (see ``plan_replay``).
        new_counts: (K_new + 1,) the new classes' positions in the step's data (index 0 unused).
        plan: The step's replay plan.
        formulas: The setting's coefficients.

    Returns:
        (K_old + K_new + 1,) background, old classes, new classes.
    """
    f = formulas
    background = f.background_seen_share * found[:1] + plan.previous_background
    old = counts[1:] + (1 - f.found_in_deficit) * found[1:]
    return torch.cat([background, old, new_counts[1:]])


class StarClassification(LossTerm):
    """STAR's classification loss: per-class BCE, plus fake old features and background repetition.

    At step 0 every class is trained (main and auxiliary heads, as BiSeNet trains); later only the
    new classes on the main head, whose embedding the replay lives in. The step hooks set the model
    up (sigmoid outputs, new rows, the spatial path's rate), count what the old model sees in the
    new data, and build the new classes' memory at the end.

    Args:
        pos_weight: Weight of positive pixels (STAR 4).
        replay: Mix fake old-class features in (STAR).
        background_repeat: Repeat background features (STAR).
        aux_init: New rows copy the auxiliary row (DKD); False: Kaiming normal weights for every
            row STAR creates, step 0's classifier and each step's new rows (STAR model.py:85-92).
        max_replay_ratio: At most this many fake vectors per feature position of a batch, which
            bounds a step's cost whatever the history (the reference replays a class's whole
            count every epoch; its VOC 15-1 steps stay below this bound); None: no bound.
        max_replay_weight: At most this weight for the fake features and the repeated background
            together, against 1 for the real pixels (both scaled down alike past it); None: the
            reference's weights, however large (the module's docstring says why).
        lr_multipliers: Overrides of ``LR_MULTIPLIERS`` by group name, e.g. ``{"new_classes": 10}``.
        spatial_path_at_backbone_rate: In incremental steps the ``spatial_path`` group trains at the
            ``backbone`` multiplier (unless ``lr_multipliers`` names it); False: the ``head``'s.
        old_logit_threshold: The old model sees a class where its raw logit exceeds this
            (``old_label_map``): 0 is the model's own label map, 0.5 STAR's trainer.
        mean_over_replayed: Divide the step's loss by all its vectors, 1 + w_fake + w_bg (the
            reference); False: by the real feature positions only, so that the replay keeps the
            reference's share against the real pixels without slowing the new classes' learning.
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
        max_replay_ratio: float | None = 4.0,
        max_replay_weight: float | None = 1.0,
        lr_multipliers: Mapping[str, float] | None = None,
        spatial_path_at_backbone_rate: bool = True,
        old_logit_threshold: float = 0.0,
        mean_over_replayed: bool = True,
    ) -> None:
        super().__init__(1.0)
        self.stated_multipliers = {
            **LR_MULTIPLIERS,
            **{ParamGroup(k): v for k, v in (lr_multipliers or {}).items()},
        }
        self.spatial_path_at_backbone_rate = spatial_path_at_backbone_rate
        self._use_multipliers(incremental=False)
        self.pos_weight = pos_weight
        self.replay = replay
        self.background_repeat = background_repeat
        self.aux_init = aux_init
        self.max_replay_ratio = max_replay_ratio
        self.max_replay_weight = max_replay_weight
        self.old_logit_threshold = old_logit_threshold
        self.mean_over_replayed = mean_over_replayed
        self.memory: ClassMemory | None = None
        self.fakes_per_iteration: Tensor | None = None
        self.background_ratio = 0.0
        self.plan: ReplayPlan | None = None
        self.found: Tensor | None = None
        self.formulas = OVERLAPPED_FORMULAS

    # ----- step hooks -------------------------------------------------------------------------
    def on_step_start(self, ctx: StepContext) -> None:
        self.memory, self.fakes_per_iteration, self.background_ratio = None, None, 0.0
        self.plan, self.found, self.formulas = None, None, SETTING_FORMULAS[ctx.setting]
        self._use_multipliers(incremental=ctx.old_model is not None)
        if ctx.old_model is None:
            ctx.model.config = dataclasses.replace(ctx.model.config, sigmoid_outputs=True)
            if not self.aux_init:
                kaiming_rows(ctx.model.head.classifier, 0)
            return
        init_new_rows(ctx.model, ctx.old_model, self.aux_init)
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
        self._plan_replay(ctx)

    def _use_multipliers(self, incremental: bool) -> None:
        """The stated multipliers; the spatial path's is the backbone's in incremental steps (module doc)."""
        stated = self.stated_multipliers
        at_backbone = incremental and self.spatial_path_at_backbone_rate
        leader = ParamGroup.BACKBONE if at_backbone else ParamGroup.HEAD
        self.lr_multipliers = {ParamGroup.SPATIAL_PATH: stated[leader], **stated}

    @torch.no_grad()
    def _plan_replay(self, ctx: StepContext) -> None:
        """Counts what the old model finds in the step's background, then ``plan_replay`` (STAR 502-527)."""
        old_model, memory = ctx.require_old_model(), self.memory
        if memory is None:
            raise ValueError("star plans its replay from the old classes' memory: load it first")
        found = torch.zeros(ctx.num_old_classes, device=ctx.device)  # [0] = background for both
        positions_per_batch = 0
        for images, labels in ctx.train_loader:
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            features = old_model.forward_features(images)
            size = features.shape[2:]
            old_logits = old_model.forward_head(features, images.shape[2:])
            old_pred = _feature_positions(old_label_map(old_logits, self.old_logit_threshold), size)
            small = _feature_positions(labels, size)
            found += torch.bincount(old_pred[small == 0], minlength=ctx.num_old_classes).float()
            positions_per_batch = max(positions_per_batch, small.numel())
        self.found = found
        self.plan = plan_replay(
            memory.counts,
            found,
            ctx.num_classes - ctx.num_old_classes,
            len(ctx.train_loader),
            self.formulas,
        )
        cap = None if self.max_replay_ratio is None else self.max_replay_ratio * positions_per_batch
        self.fakes_per_iteration = capped_fakes(self.plan.fakes_per_iteration, cap)
        self.background_ratio = self.plan.background_ratio

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        """Adds the new classes' statistics to the memory (STAR base_trainer.py:117-122)."""
        first = max(ctx.num_old_classes, 1)
        builder = MemoryBuilder(list(range(first, ctx.num_classes)), ctx.model.embed_dim, ctx.device)
        was_training = ctx.model.training
        ctx.model.eval()
        for images, labels in ctx.train_loader:
            builder.update(ctx.model.forward_features(images.to(ctx.device)), labels.to(ctx.device))
        ctx.model.train(was_training)
        new = builder.build()
        if self.memory is None or self.plan is None or self.found is None:
            memory = new
        else:
            old = self.memory
            memory = ClassMemory(
                torch.cat([old.prototypes, new.prototypes]),
                torch.cat([old.noise, new.noise]),
                torch.cat([old.norm_mean, new.norm_mean]),
                torch.cat([old.norm_std, new.norm_std]),
                merged_counts(old.counts, self.found, new.counts, self.plan, self.formulas),
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
            parts.append(negative_bce(F.linear(fakes, weight, bias_of(classifier))[:, first:]))
            weights.append(len(fakes) / positions)
        if self.background_repeat and self.background_ratio > 0:
            size = features.shape[2:]
            old_pred = _feature_positions(
                old_label_map(batch.require_old_out().logits, self.old_logit_threshold), size
            )
            background = (old_pred == 0) & (_feature_positions(batch.labels, size) == 0)  # (B, h, w)
            repeated = features.permute(0, 2, 3, 1)[background]  # (M, D)
            parts.append(negative_bce(F.linear(repeated, weight, bias_of(classifier))[:, first:]))
            weights.append(self.background_ratio * len(repeated) / positions)
        replayed = sum(weights[1:])
        if self.max_replay_weight is not None and replayed > self.max_replay_weight:
            weights[1:] = [w * self.max_replay_weight / replayed for w in weights[1:]]
        total = sum((w * p for w, p in zip(weights, parts, strict=True)), torch.zeros_like(real))
        return (total / (sum(weights) if self.mean_over_replayed else 1.0)).sum()


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

    Args:
        weight: STAR's ``pkd`` (5).
        old_logit_threshold: Where the old model sees an old class (``old_label_map``; the module's
            docstring says why ``star`` uses 0 and STAR's trainer 0.5).
    """

    name = "old_region_mse"
    needs_old_model = True

    def __init__(self, weight: float = 1.0, old_logit_threshold: float = 0.0) -> None:
        super().__init__(weight)
        self.old_logit_threshold = old_logit_threshold

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        old_pred = old_label_map(batch.require_old_out().logits, self.old_logit_threshold)  # (B, H, W)
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


@torch.no_grad()
def kaiming_rows(classifier: nn.Conv2d, first: int) -> None:
    """Rows ``first..`` as STAR creates them (model.py:85-92): Kaiming normal weights, PyTorch's default bias.

    Kaiming normal in fan-in mode: std sqrt(2 / in_channels); the bias uniform in +-1 / sqrt(in_channels).
    """
    fresh = nn.Conv2d(classifier.in_channels, classifier.out_channels - first, 1).to(classifier.weight)
    nn.init.kaiming_normal_(fresh.weight)
    classifier.weight[first:] = fresh.weight
    bias_of(classifier)[first:] = bias_of(fresh)


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
    else:
        kaiming_rows(classifier, num_old)


def star(
    pos_weight: float = 4.0,
    old_region_mse: float = 5.0,
    sad: float = 0.05,
    kd: float = 0.0,
    aux_classifier: float = 1.0,
    replay: bool = True,
    background_repeat: bool = True,
    aux_init: bool = True,
    max_replay_ratio: float | None = 4.0,
    max_replay_weight: float | None = 1.0,
    lr_multipliers: dict[str, float] | None = None,
    spatial_path_at_backbone_rate: bool = True,
    old_logit_threshold: float = 0.0,
    mean_over_replayed: bool = True,
) -> Method:
    """STAR on DKD's framework; weights of STAR's configs/config_voc.json (pkd 5, cont 0.05, pos_weight 4).

    A weight of 0 drops the term. ``kd`` is DKD's (5 there); STAR has none. The other arguments are
    ``StarClassification``'s; ``old_logit_threshold`` applies to the old-region MSE as well.
    """
    return _star_method(
        "star",
        StarClassification(
            pos_weight,
            replay,
            background_repeat,
            aux_init,
            max_replay_ratio,
            max_replay_weight,
            lr_multipliers,
            spatial_path_at_backbone_rate,
            old_logit_threshold,
            mean_over_replayed,
        ),
        old_region_mse,
        sad,
        kd,
        aux_classifier,
    )


def star_reference(
    pos_weight: float = 4.0,
    old_region_mse: float = 5.0,
    sad: float = 0.05,
    max_replay_ratio: float | None = None,
) -> Method:
    """STAR as its code trains (jinpeng0528/STAR @9e31f36), on our BiSeNet.

    Against ``star``: no auxiliary classifier and no loss on it (STAR model.py:41 lists the step's
    classes only; our row 0 is then read by nothing, as the outputs' channel 0 is the constant 0),
    Kaiming normal rows at step 0 and for each step's new rows (model.py:85-92), new rows at 1e-2
    (x10 of our 1e-3, train_voc.py:133), the reference's replay weights however large
    (trainer_voc.py:450-455), no bound on the fakes per batch (406-420; ``max_replay_ratio`` sets one
    for a long history), and the old model's regions at raw logit 0.5 (trainer_voc.py:399, 514).
    The setting's formulas are the reference's in both (``SETTING_FORMULAS``).

    What still differs, and why:
    - BiSeNet instead of DeepLabV3: its spatial path, which STAR does not have, reads the image as a
      backbone does and trains at the backbone's rate in incremental steps, where the old-region
      MSE must hold it (at step 0, with nothing to hold, the heads' rate, as ``star``); BiSeNet's
      two auxiliary heads are trained at step 0 with the same BCE (its deep supervision, which
      STAR's single head lacks; no loss reads them later) and are dropped from every exported model.
    - The embedding's stride is 8 (STAR's 16): labels at the feature resolution are picked by
      nearest interpolation, not ``[8::16, 8::16]`` (``star_memory.labels_at``).
    - Fake features draw one norm per vector, the paper's, not one per element as STAR's code does
      (``ClassMemory.sample``), and the noise of each class is measured around its own prototype, as
      the paper says, not around class 1's as STAR's code does after step 0 (``star_memory``).
    - The step's iterations, crop and batch come from ``StepOptions`` (STAR: 60 epochs, 512 px, 24
      images; our incremental steps have a floor of ``min_iterations``).
    - The memory's D-vectors are stored in float16 (``ClassMemory.to_state``).
    """
    return _star_method(
        "star_reference",
        StarClassification(
            pos_weight,
            aux_init=False,
            max_replay_ratio=max_replay_ratio,
            max_replay_weight=None,
            lr_multipliers={ParamGroup.NEW_CLASSES: 10.0},
            old_logit_threshold=0.5,
        ),
        old_region_mse,
        sad,
        kd=0.0,
        aux_classifier=0.0,
    )


def _star_method(
    name: str,
    classification: StarClassification,
    old_region_mse: float,
    sad: float,
    kd: float,
    aux_classifier: float,
) -> Method:
    """The classification term and every other term of weight above 0; BatchNorm frozen in later steps."""
    terms: list[LossTerm] = [classification]
    for term, weight in (
        (AuxiliaryClassifier(aux_classifier), aux_classifier),
        (SigmoidDistillation(kd), kd),
        (OldRegionFeatures(old_region_mse, classification.old_logit_threshold), old_region_mse),
        (PrototypeSeparation(sad), sad),
    ):
        if weight > 0:
            terms.append(term)
    return Method(name, terms, freeze_batchnorm=True)
