"""ALIFE: adaptive logit regularizer and feature replay (the memory variant, ALIFE-M).

Paper: `ALIFE: Adaptive Logit Regularizer and Feature Replay for Incremental Semantic Segmentation`
(Oh, Baek, Ham; NeurIPS 2022) - https://arxiv.org/abs/2210.06816; code: cvlab-yonsei/ALIFE
(``run_step1.py``, ``extract_mem.py``, ``train_matrices.py``, ``update_mem.py``, ``run_step3.py``).

Stage 1 runs in the trainer's loop as three loss terms: cross-entropy on new-class pixels only,
the adaptive logit regularizer (ALI) on background pixels and plain KD on the other pixels (plain
cross-entropy at step 0). Stages 2 and 3 run in the classification term's ``on_step_end``:

1. at steps > 0, one Cayley rotation per old class maps the memorised features from the old
   model's embedding space to the current one, trained on the step's data; the memory is rotated;
2. the classifier alone is fine-tuned on the step's data (old classes pseudo-labelled by the old
   model) plus the whole rotated memory;
3. S mean embeddings per class learned in this step (background too at step 0) are appended to
   the memory: ``ctx.state["feature_memory"] = {"features": (N, D), "classes": (N,), "steps": (N,)}``.
   It holds no pixel data: one mean embedding per (sampled image, class). The step's rotations
   are kept beside it (``ctx.state["alife_rotations"]``) as a record of how the memory moved.

Weights per step: ALIFE tunes them per protocol and step (``configs/<dataset>/<task>/{k}_step1.yml``
and ``M{k}_step3.yml``). A step here is not a protocol, so ``reference_weights`` picks the protocol
whose step size (classes added per step) is nearest on a log scale - 1: VOC 15-1 (``15-5s``),
5: VOC 15-5, 10: ADE 100-10, 50: ADE 100-50 - and that protocol's row for the step index (later
steps reuse its last row). A 1-class step thus gets the 15-1 weights; arguments given to ``alife``
override them.

Differences from the code: S = A - A^T (ALIFE halves it) with A starting at zero, i.e. identity
rotations (ALIFE starts from a small random A); class means weight the embedding cells by the area
the class covers instead of upsampling the embedding to the label size; the memory is float16
unless asked otherwise; lambda_ROT stays at 15-5s's 0.99 (``scripts/voc/step2.sh``) for every step
size; stage 1 trains at the trainer's incremental multiples of the step's lr (heads and old rows 10x,
new rows 100x) where ALIFE uses one rate, at which the class of a 1-class step is never predicted
here (BENCHMARKS.md, "ALIFE's learning rates").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from training.losses import cross_entropy_over_all_pixels
from training.methods.base import Batch, LossTerm, Method, StepContext, over_heads
from training.models.bisenet import BiSeNet, bias_of

IGNORE = 255
FEATURE_MEMORY = "feature_memory"
ROTATIONS = "alife_rotations"
EPS = 1e-12


def masked_average(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true (0 when it is nowhere true)."""
    return values[mask].sum() / mask.sum().clamp_min(1)


def adaptive_logit_regularizer(logits: Tensor, old_logits: Tensor, mask: Tensor) -> Tensor:
    """ALI: soft cross-entropy of all current classes against the old model's posterior.

    Per pixel ``logsumexp_all(z) - sum_{c < C_old} p_old(c) z_c``, which equals
    ``-sum_{c < C_old} p_old(c) log softmax(z)_c`` since p_old sums to 1; its gradient is
    ``softmax(z)_c - p_old(c)`` for old classes and ``softmax(z)_c`` for new ones.

    Args:
        logits: (B, C, H, W) of the current model.
        old_logits: (B, C_old, H, W) of the frozen old model.
        mask: (B, H, W) pixels to average over (background).
    """
    log_probs = torch.log_softmax(logits.float(), dim=1)[:, : old_logits.shape[1]]
    per_pixel = -(torch.softmax(old_logits.float(), dim=1) * log_probs).sum(dim=1)  # (B, H, W)
    return masked_average(per_pixel, mask)


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 2.0, alpha: float = 1.0) -> Tensor:
    """ALIFE's stage-3 ``FocalLoss`` (``models/losses.py`` 10-25, ``CE.TYPE: fl`` in ``M{k}_step3.yml``).

    Per pixel ``alpha (1 - p_t)^gamma CE`` with ``p_t = exp(-CE)``, averaged over all pixels (ignored
    ones have CE 0 and count 0), with ALIFE's defaults gamma 2, alpha 1.

    Args:
        logits: (B, C, H, W).
        labels: (B, H, W), 255 ignored.
    """
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")  # (B, H, W)
    return (alpha * (1 - torch.exp(-ce)) ** gamma * ce).mean()


@dataclass(frozen=True)
class StepWeights:
    """ALIFE's loss weights of one incremental step.

    Attributes:
        ali: Stage 1 ``LOSS.MY.WEIGHT`` (lambda_ALI).
        kd: Stage 1 ``LOSS.KD.WEIGHT``.
        finetune_ali: Stage 3 ``LOSS.MY.WEIGHT``.
        memory: Stage 3 ``LOSS.MEMORY.WEIGHT`` (lambda_MEM).
    """

    ali: float
    kd: float
    finetune_ali: float
    memory: float


# Classes added per step -> the weights of that protocol's steps 1, 2, ... (cvlab-yonsei/ALIFE @0e39e6f).
REFERENCE_WEIGHTS: dict[int, tuple[StepWeights, ...]] = {
    # VOC 15-1: configs/voc/15-5s/{1..5}_step1.yml (MY 3/5/2/3/2, KD 1/10/1/10/1) and
    # M{1..5}_step3.yml (MY 3/5/2/3/1, MEMORY 1/20/1/2/1).
    1: (
        StepWeights(ali=3.0, kd=1.0, finetune_ali=3.0, memory=1.0),
        StepWeights(ali=5.0, kd=10.0, finetune_ali=5.0, memory=20.0),
        StepWeights(ali=2.0, kd=1.0, finetune_ali=2.0, memory=1.0),
        StepWeights(ali=3.0, kd=10.0, finetune_ali=3.0, memory=2.0),
        StepWeights(ali=2.0, kd=1.0, finetune_ali=1.0, memory=1.0),
    ),
    # VOC 15-5: configs/voc/15-5/1_step1.yml (MY 2, KD 1), M1_step3.yml (MY 1, MEMORY 10).
    5: (StepWeights(ali=2.0, kd=1.0, finetune_ali=1.0, memory=10.0),),
    # ADE 100-10: configs/ade/100-10/{1..5}_step1.yml (MY 1, KD 1), M{1..5}_step3.yml
    # (MY 5/5/2/0/0, MEMORY 2/1/1/0.1/0.5).
    10: (
        StepWeights(ali=1.0, kd=1.0, finetune_ali=5.0, memory=2.0),
        StepWeights(ali=1.0, kd=1.0, finetune_ali=5.0, memory=1.0),
        StepWeights(ali=1.0, kd=1.0, finetune_ali=2.0, memory=1.0),
        StepWeights(ali=1.0, kd=1.0, finetune_ali=0.0, memory=0.1),
        StepWeights(ali=1.0, kd=1.0, finetune_ali=0.0, memory=0.5),
    ),
    # ADE 100-50: configs/ade/100-50/1_step1.yml (MY 1, KD 1), M1_step3.yml (MY 0, MEMORY 0.5).
    50: (StepWeights(ali=1.0, kd=1.0, finetune_ali=0.0, memory=0.5),),
}


def reference_weights(num_new_classes: int, step: int) -> StepWeights:
    """ALIFE's weights for an incremental step adding ``num_new_classes`` classes at index ``step`` >= 1.

    The protocol is the one of ``REFERENCE_WEIGHTS`` whose step size is nearest on a log scale (ties go
    to the smaller size); its row ``step`` is used, or its last row for later steps.
    """
    if num_new_classes < 1 or step < 1:
        raise ValueError(f"an incremental step adds >= 1 class at step >= 1, got {num_new_classes} at {step}")
    size = min(REFERENCE_WEIGHTS, key=lambda n: abs(math.log(n) - math.log(num_new_classes)))
    rows = REFERENCE_WEIGHTS[size]
    return rows[min(step, len(rows)) - 1]


def poly_schedule(optimizer: torch.optim.Optimizer, iterations: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(iterations, 1), power=0.9)


@dataclass(frozen=True)
class ReplayOptions:
    """Stage 2 and 3 settings (the ALIFE scripts' values unless noted).

    Attributes:
        memory_size: S, mean embeddings stored per class (1000 in the scripts).
        memory_dtype: Storage type of the memory (float16 halves ALIFE's float32 footprint).
        min_area: A class is sampled from images where it covers more than this fraction.
        draw_rounds: Redraws for samples whose region vanished (augmentation); a class keeps what it
            has after that many rounds.
        temperature: Sharpness of the soft pixel assignment to a class (tau).
        rotation_lambda: Weight of the cosine loss against the classification loss (lambda_ROT).
        rotation_epochs: Epochs of rotation training over the step's data.
        rotation_lr: Adam learning rate of the rotations.
        finetune_epochs: Epochs of classifier fine-tuning.
        finetune_lr: SGD learning rate of the fine-tuning (ALIFE's incremental rate).
        finetune_ali: Weight of ALI during fine-tuning (None: ``reference_weights``).
        memory_weight: Weight of the cross-entropy on the memory, lambda_MEM (None: ``reference_weights``).
        focal_gamma: Focusing parameter of the fine-tuning's focal loss (ALIFE's ``FocalLoss`` default).
    """

    memory_size: int = 1000
    memory_dtype: torch.dtype = torch.float16
    min_area: float = 0.005
    draw_rounds: int = 10
    temperature: float = 10.0
    rotation_lambda: float = 0.99
    rotation_epochs: int = 10
    rotation_lr: float = 1e-2
    finetune_epochs: int = 1
    finetune_lr: float = 1e-3
    finetune_ali: float | None = None
    memory_weight: float | None = None
    focal_gamma: float = 2.0

    def for_step(self, ctx: StepContext) -> ReplayOptions:
        """These options with the step's reference weights filled in where none was given."""
        weights = reference_weights(len(ctx.new_class_indices), ctx.step)
        return replace(
            self,
            finetune_ali=weights.finetune_ali if self.finetune_ali is None else self.finetune_ali,
            memory_weight=weights.memory if self.memory_weight is None else self.memory_weight,
        )


@dataclass
class FeatureMemory:
    """Memorised mean embeddings: ``features`` (N, D), ``classes`` (N,) and ``steps`` (N,) int64."""

    features: Tensor
    classes: Tensor
    steps: Tensor

    @classmethod
    def empty(cls, dim: int, dtype: torch.dtype, device: torch.device) -> FeatureMemory:
        index = torch.zeros(0, dtype=torch.long, device=device)
        return cls(torch.zeros(0, dim, dtype=dtype, device=device), index, index.clone())

    @classmethod
    def from_state(cls, ctx: StepContext, dtype: torch.dtype) -> FeatureMemory:
        """The memory in ``ctx.state`` (empty when there is none), on ``ctx.device``."""
        stored = ctx.state.get(FEATURE_MEMORY)
        if stored is None:
            return cls.empty(ctx.model.embed_dim, dtype, ctx.device)
        if stored["features"].shape[1] != ctx.model.embed_dim:
            raise ValueError(
                f"feature memory has {stored['features'].shape[1]} dims, the model {ctx.model.embed_dim}"
            )
        return cls(
            stored["features"].to(ctx.device, dtype),
            stored["classes"].to(ctx.device),
            stored["steps"].to(ctx.device),
        )

    def save(self, ctx: StepContext) -> None:
        ctx.state[FEATURE_MEMORY] = {"features": self.features, "classes": self.classes, "steps": self.steps}

    def __len__(self) -> int:
        return self.features.shape[0]

    def cat(self, other: FeatureMemory) -> FeatureMemory:
        return FeatureMemory(
            torch.cat([self.features, other.features.to(self.features.dtype)]),
            torch.cat([self.classes, other.classes]),
            torch.cat([self.steps, other.steps]),
        )


class CayleyRotation(nn.Module):
    """K rotations ``R = (I - S)(I + S)^-1`` with ``S = A - A^T``, A strictly upper triangular.

    ``I + S`` is always invertible (S has imaginary eigenvalues), R is orthogonal with determinant
    +1, and the zero parameters give the identity. ``(I - S)`` and ``(I + S)^-1`` commute, so R is
    computed as ``solve(I + S, I - S)`` in float64 and cast back, which keeps ``R R^T = I`` to ~1e-7.

    Args:
        count: K, the number of rotations.
        dim: D, the dimension they act on.
    """

    rows: Tensor  # (D (D - 1) / 2,) row and column of each parameter in A (buffers)
    cols: Tensor

    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.upper = nn.Parameter(torch.zeros(count, dim * (dim - 1) // 2))  # (K, D (D - 1) / 2)
        rows, cols = torch.triu_indices(dim, dim, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def matrices(self) -> Tensor:
        """(K, D, D) rotation matrices."""
        count = self.upper.shape[0]
        a = self.upper.new_zeros(count, self.dim, self.dim, dtype=torch.float64)
        a[:, self.rows, self.cols] = self.upper.double()
        skew = a - a.transpose(1, 2)
        eye = torch.eye(self.dim, dtype=torch.float64, device=a.device)
        # One solve per matrix: torch 2.14's batched CPU LU (MKL) fails once set_num_threads is called.
        rotations = [torch.linalg.solve(eye + s, eye - s) for s in skew]
        return torch.stack(rotations).to(self.upper.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Rotates row k of (K, D) by R_k."""
        return torch.einsum("kij,kj->ki", self.matrices(), x)


def _loader(ctx: StepContext, dataset: Dataset) -> DataLoader:
    """An ordered loader over ``dataset`` with the step loader's batch size and workers."""
    source = ctx.mask_loader()
    return DataLoader(dataset, batch_size=source.batch_size or 1, num_workers=source.num_workers)


@torch.no_grad()
def extract_memory(ctx: StepContext, classes: list[int], options: ReplayOptions) -> FeatureMemory:
    """S mean embeddings per class, each from a random image (with replacement) showing the class.

    Candidates are the step's images where the class covers more than ``min_area`` of the pixels.
    Each draw loads the image again (fresh augmentation, as ALIFE), runs the model in eval mode and
    averages the embedding over the class region, weighting each embedding cell by the fraction of
    it the region covers (the labels area-downsampled to the embedding's size). Draws whose region
    shrank below ``min_area`` are redrawn.
    """
    dataset = ctx.mask_loader().dataset
    candidates: dict[int, list[int]] = defaultdict(list)
    first = 0
    for _, labels in _loader(ctx, dataset):
        for c in classes:
            shown = (labels == c).float().mean(dim=(1, 2)) > options.min_area  # (B,)
            candidates[c] += (first + torch.nonzero(shown).flatten()).tolist()
        first += labels.shape[0]
    model, was_training = ctx.model, ctx.model.training
    model.eval()
    found: dict[int, list[Tensor]] = defaultdict(list)
    for _ in range(options.draw_rounds):
        draws = [
            (candidates[c][i], c)
            for c in classes
            if candidates[c] and len(found[c]) < options.memory_size
            for i in torch.randint(len(candidates[c]), (options.memory_size - len(found[c]),)).tolist()
        ]
        if not draws:
            break
        done = 0
        for images, labels in _loader(ctx, Subset(dataset, [index for index, _ in draws])):
            drawn = [c for _, c in draws[done : done + labels.shape[0]]]
            done += labels.shape[0]
            features = model.forward_features(images.to(ctx.device)).float()  # (B, D, h, w)
            region = (labels.to(ctx.device) == torch.tensor(drawn, device=ctx.device)[:, None, None]).float()
            weights = F.interpolate(region[:, None], size=features.shape[2:], mode="area")  # (B, 1, h, w)
            means = (features * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp_min(EPS)  # (B, D)
            for c, mean, area in zip(drawn, means, region.mean(dim=(1, 2)), strict=True):
                if area > options.min_area and len(found[c]) < options.memory_size:
                    found[c].append(mean)
    model.train(was_training)
    memory = FeatureMemory.empty(ctx.model.embed_dim, options.memory_dtype, ctx.device)
    for c in classes:
        if found[c]:
            n = len(found[c])
            memory = memory.cat(
                FeatureMemory(
                    torch.stack(found[c]),
                    torch.full((n,), c, dtype=torch.long, device=ctx.device),
                    torch.full((n,), ctx.step, dtype=torch.long, device=ctx.device),
                )
            )
    return memory


def soft_class_assignment(
    memory: FeatureMemory, classes: Tensor, features: Tensor, temperature: float
) -> Tensor:
    """Per class, softmax over pixels of ``temperature * sum_m relu(cos(memory_m, feature))``.

    Args:
        memory: Memory of the K classes.
        classes: (K,) class of each row of the result.
        features: (P, D) embeddings of the old model.

    Returns:
        (K, P) pixel weights, each row summing to 1.
    """
    normed_features = F.normalize(features, dim=1)  # (P, D)
    rows = torch.searchsorted(classes, memory.classes)  # (N,) row of each memory vector
    scores = features.new_zeros(classes.shape[0], features.shape[0])  # (K, P)
    for start in range(0, len(memory), 1024):  # bounded (1024, P) blocks
        block = F.normalize(memory.features[start : start + 1024].float(), dim=1)
        scores.index_add_(0, rows[start : start + 1024], F.relu(block @ normed_features.T))
    return torch.softmax(temperature * scores, dim=1)


def _embeddings(model: BiSeNet, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B h w, D) embeddings, one row per pixel."""
    features = model.forward_features(images).float()
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def train_rotations(ctx: StepContext, memory: FeatureMemory, options: ReplayOptions) -> tuple[Tensor, Tensor]:
    """Learns one rotation per memorised old class from the old to the current embedding space.

    For each batch of the step's data and each class c: pixel weights from the memory (see
    ``soft_class_assignment``) give representatives ``rep_prev_c``, ``rep_curr_c`` (weighted means of
    the old and current embeddings, centred by their mean over classes, offsets ``off_prev``,
    ``off_curr``). Loss: ``(1 - lambda) CE(classifier(R_c rep_prev_c + off_curr), c) +
    lambda (1 - cos(R_c rep_prev_c, rep_curr_c))``, averaged over classes; Adam with poly decay.
    Both models are frozen (eval mode).

    Returns:
        Rotations (K, D, D) and their classes (K,), ascending.
    """
    classes = torch.unique(memory.classes)  # (K,)
    rotation = CayleyRotation(classes.shape[0], ctx.model.embed_dim).to(ctx.device)
    optimizer = torch.optim.Adam(rotation.parameters(), lr=options.rotation_lr)
    scheduler = poly_schedule(optimizer, options.rotation_epochs * len(ctx.train_loader))
    classifier = ctx.model.head.classifier
    weight, bias = classifier.weight.detach().flatten(1), bias_of(classifier).detach()  # (C, D), (C,)
    old_model = ctx.require_old_model()
    lam = options.rotation_lambda
    ctx.model.eval()
    for _ in range(options.rotation_epochs):
        for images, _ in ctx.train_loader:
            with torch.no_grad():
                images = images.to(ctx.device)
                prev, curr = _embeddings(old_model, images), _embeddings(ctx.model, images)  # (P, D)
                weights = soft_class_assignment(memory, classes, prev, options.temperature)  # (K, P)
                rep_prev, rep_curr = weights @ prev, weights @ curr  # (K, D)
                off_prev, off_curr = rep_prev.mean(dim=0), rep_curr.mean(dim=0)
                rep_prev, rep_curr = rep_prev - off_prev, rep_curr - off_curr
            rotated = rotation(rep_prev)  # (K, D)
            ce = F.cross_entropy(F.linear(rotated + off_curr, weight, bias), classes)
            cosine = (1 - F.cosine_similarity(rotated, rep_curr, dim=1)).mean()
            loss = (1 - lam) * ce + lam * cosine
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        return rotation.matrices(), classes


def rotate_memory(memory: FeatureMemory, rotations: Tensor, classes: Tensor) -> FeatureMemory:
    """``memory_c <- R_c memory_c`` for every class c of ``classes``."""
    features = memory.features.clone()
    for rotation, c in zip(rotations, classes.tolist(), strict=True):
        rows = memory.classes == c
        features[rows] = (features[rows].float() @ rotation.T).to(features.dtype)
    return FeatureMemory(features, memory.classes, memory.steps)


def finetune_loss(
    logits: Tensor,
    old_logits: Tensor,
    labels: Tensor,
    memory_logits: Tensor,
    memory_classes: Tensor,
    options: ReplayOptions,
) -> Tensor:
    """ALIFE's stage-3 loss of one batch (``run_step3.py`` 140-148), the classifier's fine-tuning.

    Focal loss on the labels with background (0) replaced by the old model's argmax, plus
    ``finetune_ali`` x ALI on background pixels, plus ``memory_weight`` x cross-entropy of the
    memorised vectors against their classes (mean over vectors; none when the memory is empty).

    Args:
        logits: (B, C, H, W) of the current model.
        old_logits: (B, C_old, H, W) of the frozen old model.
        labels: (B, H, W), 255 ignored, labels below C_old count as background.
        memory_logits: (N, C) of the classifier on the memorised vectors.
        memory_classes: (N,) their classes.
        options: With ``finetune_ali`` and ``memory_weight`` filled in (``ReplayOptions.for_step``).
    """
    if options.finetune_ali is None or options.memory_weight is None:
        raise ValueError("finetune_loss needs the step's weights: pass options.for_step(ctx)")
    targets = torch.where(labels == 0, old_logits.argmax(dim=1), labels)  # (B, H, W)
    loss = focal_loss(logits, targets, gamma=options.focal_gamma)
    background = labels < old_logits.shape[1]
    loss = loss + options.finetune_ali * adaptive_logit_regularizer(logits, old_logits, background)
    if len(memory_classes):
        loss = loss + options.memory_weight * F.cross_entropy(memory_logits, memory_classes)
    return loss


def finetune_classifier(ctx: StepContext, memory: FeatureMemory, options: ReplayOptions) -> None:
    """Trains ``model.head.classifier`` alone (everything else frozen, BatchNorm in eval mode).

    Loss per batch: ``finetune_loss``, with every memorised vector as a 1x1 input of the classifier.
    SGD, poly decay. ``options`` must have its weights filled in (``ReplayOptions.for_step``).
    """
    if options.finetune_ali is None or options.memory_weight is None:
        raise ValueError("finetune_classifier needs the step's weights: pass options.for_step(ctx)")
    model, classifier, old_model = ctx.model, ctx.model.head.classifier, ctx.require_old_model()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    for param in classifier.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=options.finetune_lr, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    scheduler = poly_schedule(optimizer, options.finetune_epochs * len(ctx.train_loader))
    vectors = memory.features.float()[:, :, None, None]  # (N, D, 1, 1)
    model.eval()
    for _ in range(options.finetune_epochs):
        for images, labels in ctx.train_loader:
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            with torch.no_grad():
                features = model.forward_features(images)
                old_logits = old_model(images)  # (B, C_old, H, W)
            logits = model.forward_head(features, images.shape[2:])  # (B, C, H, W)
            memory_logits = classifier(vectors).flatten(1)  # (N, C)
            loss = finetune_loss(logits, old_logits, labels, memory_logits, memory.classes, options)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    for param, flag in flags:
        param.requires_grad_(flag)


class FeatureReplay:
    """ALIFE's stages 2 and 3 at the end of a step (see the module docstring)."""

    def __init__(self, options: ReplayOptions) -> None:
        self.options = options

    def run(self, ctx: StepContext) -> None:
        was_training = ctx.model.training
        memory = FeatureMemory.from_state(ctx, self.options.memory_dtype)
        if ctx.old_model is not None:
            if len(memory):
                rotations, classes = train_rotations(ctx, memory, self.options)
                memory = rotate_memory(memory, rotations, classes)
                ctx.state[ROTATIONS] = {
                    "rotations": rotations.float(),
                    "classes": classes,
                    "step": torch.tensor(ctx.step),
                }
            finetune_classifier(ctx, memory, self.options.for_step(ctx))
        stored = set(memory.classes.tolist())
        missing = [c for c in ctx.new_class_indices if c not in stored]
        memory.cat(extract_memory(ctx, missing, self.options)).save(ctx)
        ctx.model.train(was_training)


class NewClassCrossEntropy(LossTerm):
    """Cross-entropy on new-class pixels only (background and old labels ignored); all labels at step 0.

    Mean over all pixels, the ignored ones (background included) counting 0: ALIFE ``run_step1.py``
    142-143 sets background to 255 and takes ``CrossEntropyLoss(reduction='none')(...).mean()``.
    (An earlier version divided by the number of new-class pixels, 14-50x stronger on 1-class
    steps.) On the auxiliary heads too at step 0 only. With ``replay`` its ``on_step_end`` runs
    ALIFE's stages 2 and 3 (the classifier's final fine-tuning).
    """

    name = "alife_ce"
    classifies = True

    def __init__(self, weight: float = 1.0, replay: FeatureReplay | None = None) -> None:
        super().__init__(weight)
        self.replay = replay

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        if ctx.old_model is None:
            return over_heads(batch, lambda logits: cross_entropy_over_all_pixels(logits, batch.labels))
        # Main head only: the auxiliary heads have no ALI/KD counterpart (the teacher has none), and a
        # cross-entropy that sees only new-class pixels would pull the shared features to the new class.
        return cross_entropy_over_all_pixels(
            batch.out.logits, torch.where(batch.labels < ctx.num_old_classes, IGNORE, batch.labels)
        )

    def on_step_end(self, ctx: StepContext) -> None:
        if self.replay is not None:
            self.replay.run(ctx)


class StepWeightedTerm(LossTerm):
    """A stage-1 term whose weight is ALIFE's reference weight of each step unless one is given.

    Args:
        weight: Fixed weight, or None for the ``weight_name`` field of ``reference_weights`` at each step.
    """

    weight_name: str = "ali"

    def __init__(self, weight: float | None = None) -> None:
        super().__init__(getattr(REFERENCE_WEIGHTS[1][0], self.weight_name) if weight is None else weight)
        self.fixed_weight = weight

    def on_step_start(self, ctx: StepContext) -> None:
        if self.fixed_weight is None and ctx.old_model is not None:
            self.weight = getattr(reference_weights(len(ctx.new_class_indices), ctx.step), self.weight_name)


class AdaptiveLogitRegularizer(StepWeightedTerm):
    """ALI on background pixels (labels below C_old), see ``adaptive_logit_regularizer``.

    Mean over background pixels (ALIFE ``run_step1.py`` 137-139, ``hihohu[bg_region].mean()``).
    """

    name = "ali"
    weight_name = "ali"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        background = batch.labels < ctx.num_old_classes
        return adaptive_logit_regularizer(batch.out.logits, batch.require_old_out().logits, background)


class ForegroundDistillation(StepWeightedTerm):
    """Plain KD over the old classes (LwF's) averaged over the non-background pixels (new and ignore).

    ALIFE ``run_step1.py`` 140: ``KnowledgeDistillationLoss(reduction='none')(...)[~bg_region].mean()``.
    """

    name = "alife_kd"
    weight_name = "kd"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        old_logits = batch.require_old_out().logits.float()
        log_q = torch.log_softmax(batch.out.logits.float()[:, : old_logits.shape[1]], dim=1)
        per_pixel = -(log_q * torch.softmax(old_logits, dim=1)).mean(dim=1)  # (B, H, W)
        return masked_average(per_pixel, batch.labels >= ctx.num_old_classes)


MEMORY_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# ALIFE's FREEZE_TYPE "step1" freezes the BatchNorm of DeepLab-v3's backbone and ASPP
# (models/deeplabv3.py 438-440) and keeps the decoder's last_conv BatchNorm training. On BiSeNet:
# backbone (ResNet) -> context_path.stem/layer1-4; ASPP (multi-scale context on the backbone output,
# image pooling included) -> the context path's ARMs, global context and refine convs (all in
# context_path); the spatial path is BiSeNet's second image encoder, frozen with the backbone;
# decoder.last_conv (conv-BN-ReLU before the classifier) -> fusion + head.embed, left training. The
# auxiliary heads only train at step 0 (NewClassCrossEntropy) and do not feed the main output.
FROZEN_BATCHNORM = ("spatial_path", "context_path")


def alife(
    ali: float | None = None, kd: float | None = None, replay: bool = True, **replay_options: Any
) -> Method:
    """ALIFE-M with ALIFE's per-step weights (see ``reference_weights``); ``replay=False`` gives ALIFE.

    Args:
        ali: Weight of the adaptive logit regularizer (None: the step's reference weight).
        kd: Weight of the distillation on labelled foreground pixels (None: the step's reference weight).
        replay: Run stages 2 and 3 (feature memory, rotations, classifier fine-tuning).
        **replay_options: ``ReplayOptions`` fields, e.g. ``memory_size=200``, ``memory_dtype="float32"``.
    """
    if "memory_dtype" in replay_options:
        dtype = replay_options["memory_dtype"]
        if dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {sorted(MEMORY_DTYPES)}, got {dtype!r}")
        replay_options["memory_dtype"] = MEMORY_DTYPES[dtype]
    feature_replay = FeatureReplay(ReplayOptions(**replay_options)) if replay else None
    terms = [
        NewClassCrossEntropy(replay=feature_replay),
        AdaptiveLogitRegularizer(ali),
        ForegroundDistillation(kd),
    ]
    return Method("alife", terms, freeze_batchnorm=True, batchnorm_modules=FROZEN_BATCHNORM)
