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

Differences from the code: cross-entropies average over the non-ignored pixels (ALIFE averages over
all pixels, ignored ones counting 0); S = A - A^T (ALIFE halves it) with A starting at zero, i.e.
identity rotations (ALIFE starts from a small random A); stage 3 uses cross-entropy (ALIFE's
configs pick a focal loss); class means weight the embedding cells by the area the class covers
instead of upsampling the embedding to the label size; the memory is float16 unless asked otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from training.methods.base import Batch, LossTerm, Method, StepContext, over_heads

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


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over the non-ignored pixels (0, not NaN, when every pixel is ignored)."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp_min(1)


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
        finetune_ali: Weight of ALI during fine-tuning.
        memory_weight: Weight of the cross-entropy on the memory (lambda_MEM).
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
    finetune_ali: float = 1.0
    memory_weight: float = 1.0


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
    source = ctx.train_loader
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
    dataset = ctx.train_loader.dataset
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


def _embeddings(model: nn.Module, images: Tensor) -> Tensor:
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
    weight, bias = classifier.weight.detach().flatten(1), classifier.bias.detach()  # (C, D), (C,)
    lam = options.rotation_lambda
    ctx.model.eval()
    for _ in range(options.rotation_epochs):
        for images, _ in ctx.train_loader:
            with torch.no_grad():
                images = images.to(ctx.device)
                prev, curr = _embeddings(ctx.old_model, images), _embeddings(ctx.model, images)  # (P, D)
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


def finetune_classifier(ctx: StepContext, memory: FeatureMemory, options: ReplayOptions) -> None:
    """Trains ``model.head.classifier`` alone (everything else frozen, BatchNorm in eval mode).

    Loss per batch: cross-entropy on the labels with background pixels replaced by the old model's
    argmax, ``finetune_ali`` x ALI on background pixels, and ``memory_weight`` x cross-entropy of the
    classifier on every memorised vector (as a 1x1 input) against its class. SGD, poly decay.
    """
    model, classifier = ctx.model, ctx.model.head.classifier
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
                old_logits = ctx.old_model(images)  # (B, C_old, H, W)
            logits = model.forward_head(features, images.shape[2:])  # (B, C, H, W)
            targets = torch.where(labels == 0, old_logits.argmax(dim=1), labels)
            loss = cross_entropy(logits, targets)
            background = labels < ctx.num_old_classes
            loss = loss + options.finetune_ali * adaptive_logit_regularizer(logits, old_logits, background)
            if len(memory):
                memory_logits = classifier(vectors).flatten(1)  # (N, C)
                loss = loss + options.memory_weight * F.cross_entropy(memory_logits, memory.classes)
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
            finetune_classifier(ctx, memory, self.options)
        stored = set(memory.classes.tolist())
        missing = [c for c in ctx.new_class_indices if c not in stored]
        memory.cat(extract_memory(ctx, missing, self.options)).save(ctx)
        ctx.model.train(was_training)


class NewClassCrossEntropy(LossTerm):
    """Cross-entropy on new-class pixels only (background and old labels ignored); all pixels at step 0.

    Mean over the non-ignored pixels; on the auxiliary heads too at step 0 only. With ``replay`` its
    ``on_step_end`` runs ALIFE's stages 2 and 3 (the classifier's final fine-tuning).
    """

    name = "alife_ce"
    classifies = True

    def __init__(self, weight: float = 1.0, replay: FeatureReplay | None = None) -> None:
        super().__init__(weight)
        self.replay = replay

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        if ctx.old_model is None:
            return over_heads(batch, lambda logits: cross_entropy(logits, batch.labels))
        # Main head only: the auxiliary heads have no ALI/KD counterpart (the teacher has none), and a
        # cross-entropy that sees only new-class pixels would pull the shared features to the new class.
        return cross_entropy(
            batch.out.logits, torch.where(batch.labels < ctx.num_old_classes, IGNORE, batch.labels)
        )

    def on_step_end(self, ctx: StepContext) -> None:
        if self.replay is not None:
            self.replay.run(ctx)


class AdaptiveLogitRegularizer(LossTerm):
    """ALI on background pixels (labels below C_old), see ``adaptive_logit_regularizer``."""

    name = "ali"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        background = batch.labels < ctx.num_old_classes
        return adaptive_logit_regularizer(batch.out.logits, batch.old_out.logits, background)


class ForegroundDistillation(LossTerm):
    """Plain KD over the old classes (LwF's) averaged over the non-background pixels (new and ignore)."""

    name = "alife_kd"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        old_logits = batch.old_out.logits.float()
        log_q = torch.log_softmax(batch.out.logits.float()[:, : old_logits.shape[1]], dim=1)
        per_pixel = -(log_q * torch.softmax(old_logits, dim=1)).mean(dim=1)  # (B, H, W)
        return masked_average(per_pixel, batch.labels >= ctx.num_old_classes)


MEMORY_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def alife(ali: float = 1.0, kd: float = 1.0, replay: bool = True, **replay_options) -> Method:
    """ALIFE-M (VOC 19-1 weights: ALI 1, KD 1, memory 1); ``replay=False`` gives ALIFE (stage 1 only).

    Args:
        ali: Weight of the adaptive logit regularizer.
        kd: Weight of the distillation on labelled foreground pixels.
        replay: Run stages 2 and 3 (feature memory, rotations, classifier fine-tuning).
        **replay_options: ``ReplayOptions`` fields, e.g. ``memory_size=200``, ``memory_dtype="float32"``.
    """
    if "memory_dtype" in replay_options:
        dtype = replay_options["memory_dtype"]
        if dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {sorted(MEMORY_DTYPES)}, got {dtype!r}")
        replay_options["memory_dtype"] = MEMORY_DTYPES[dtype]
    replay = ReplayOptions(**replay_options) if replay else None
    feature_replay = FeatureReplay(replay) if replay is not None else None
    terms = [
        NewClassCrossEntropy(replay=feature_replay),
        AdaptiveLogitRegularizer(ali),
        ForegroundDistillation(kd),
    ]
    return Method("alife", terms, freeze_batchnorm=True)
