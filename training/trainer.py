"""One class-incremental training step: the loop every entry point (CLI, benchmark, worker) runs.

``train_step`` grows the previous model for the new classes, trains it with the method's summed
loss terms while the previous model is frozen as the teacher, runs the methods' end-of-step
hooks, evaluates, and returns a new ``ModelBundle`` (the caller saves it).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from training.data.dataset import WeakItem, WeakSegmentationDataset
from training.method_spec import check_continuation
from training.methods import Method, StepContext
from training.methods.base import Batch
from training.methods.weak import PSEUDO_LABELS_KEY
from training.metrics import ConfusionMatrix, SegmentationScores
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig
from training.optim import build_optimizer, epochs_for, resolve_multipliers, scale_new_rows
from training.options import ParamGroup, StepOptions
from training.protocols import Setting

PREPARING_PHASE = "preparing"  # growing the model, the methods' step-start work (e.g. PLOP's pseudo-labels)
TRAINING_PHASE = "training"
END_OF_STEP_PHASE = "end-of-step"  # the methods' step-end hooks: SDR prototypes, ALIFE rotations + replay
EVALUATING_PHASE = "evaluating"
SAVING_PHASE = "saving"


class StepCancelled(Exception):
    """The step stopped because its ``should_stop`` callable returned True; nothing was saved."""


@dataclass(frozen=True)
class StepProgress:
    """Reported after every iteration, and once at the start of each phase; ``fraction`` in [0, 1].

    ``phase`` is ``training`` for the per-iteration reports; the other phases (``preparing``,
    ``end-of-step``, ``evaluating``, ``saving``) are reported once as they begin, with the iteration
    count reached so far, no loss terms, and ``loss`` the last iteration's (NaN before the first).
    """

    epoch: int
    iteration: int
    total_iterations: int
    loss: float
    losses: dict[str, float]
    phase: str = TRAINING_PHASE

    @property
    def fraction(self) -> float:
        return self.iteration / max(self.total_iterations, 1)


ProgressCallback = Callable[[StepProgress], None]
StopCheck = Callable[[], bool]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(
    model: BiSeNet, loader: DataLoader, class_names: list[str], num_old: int, device: torch.device
) -> SegmentationScores:
    """Scores ``model`` on ``loader`` (labels in model indices); old = classes ``< num_old``."""
    model.eval()
    confusion = ConfusionMatrix(model.num_classes)
    for images, labels in loader:
        predictions = model(images.to(device)).argmax(dim=1)  # (B, H, W)
        confusion.update(predictions.cpu(), labels)
    return SegmentationScores.from_confusion(confusion, class_names, num_old)


def unpack(
    raw: WeakItem | list[Tensor], device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """A loader's batch on ``device``: images, labels, and the image labels and weak flags of a ``WeakItem``
    batch (None for a batch of (image, mask) pairs)."""
    if isinstance(raw, WeakItem):
        images, labels, image_labels, weak = (t.to(device, non_blocking=True) for t in raw)
        return images, labels, image_labels, weak
    images, labels = raw
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True), None, None


class PseudoLabelledLoader:
    """The step hooks' view of a loader of ``WeakItem`` batches: (images, labels) pairs whose weak images
    carry the method's pseudo-labels (``Method.hook_labels``), computed with both models in eval mode.

    Args:
        loader: The step's loader of ``WeakItem`` batches.
        method: The step's method (its weak term labels the images).
        ctx: The step's context (its models and progress).
    """

    def __init__(self, loader: DataLoader, method: Method, ctx: StepContext) -> None:
        self.loader, self.method, self.ctx = loader, method, ctx

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        ctx = self.ctx
        old_model = ctx.require_old_model()
        for raw in self.loader:
            images, labels, image_labels, weak = unpack(raw, ctx.device)
            was_training = ctx.model.training
            ctx.model.eval()
            with torch.no_grad():
                batch = Batch(
                    images,
                    labels,
                    ctx.model.forward_train(images),
                    old_model.forward_train(images),
                    image_labels,
                    weak,
                )
                labels = self.method.hook_labels(batch, ctx)
            ctx.model.train(was_training)
            yield images, labels


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _frozen_teacher(model: BiSeNet) -> BiSeNet:
    teacher = copy.deepcopy(model)
    teacher.aux_heads = torch.nn.ModuleList()
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def train_step(
    base: ModelBundle | None,
    new_classes: list[str],
    train_set: Dataset,
    val_set: Dataset | None,
    method: Method,
    options: StepOptions,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[ModelBundle, SegmentationScores | None]:
    """Trains one step and returns the new model and its validation scores.

    Args:
        base: The previous model (loaded with ``aux=True``) or None for step 0.
        new_classes: Names of the classes this step adds, in the order of their label indices.
        train_set: Yields (image (3, S, S), labels (S, S)) in the new model's class indices, or
            ``WeakItem`` (a ``WeakSegmentationDataset``: image-level labels; the method must then have the
            weak term, ``training.methods.weak.with_weak_labels``).
        val_set: Same for validation (labels of all seen classes) or None to skip evaluation.
        method: Loss terms to sum.
        options: Hyper-parameters.
        on_progress: Called after every iteration and as each phase begins.
        should_stop: Polled before every iteration and phase; True stops the step.

    Raises:
        StepCancelled: ``should_stop`` returned True.
        TypeError: A dataset without a length (the epochs and iterations are counted from it).
        ValueError: Image-level labels at step 0 ("step 0 needs masks"), or image-level labels and the
            method's weak term not given together.
    """
    if not isinstance(train_set, Sized):
        raise TypeError(f"the training set needs a length, got {type(train_set).__name__}")
    if val_set is not None and not isinstance(val_set, Sized):
        raise TypeError(f"the validation set needs a length, got {type(val_set).__name__}")
    epoch, iteration, total, last_loss = 0, 0, 0, float("nan")

    def begin(phase: str) -> None:
        if should_stop is not None and should_stop():
            raise StepCancelled(f"cancelled before {phase} (iteration {iteration} of {total})")
        if on_progress is not None:
            on_progress(StepProgress(epoch, iteration, total, last_loss, {}, phase))

    begin(PREPARING_PHASE)
    seed_everything(options.seed)
    device = options.torch_device()
    started = datetime.now(UTC)
    if base is None:
        config = BiSeNetConfig(
            num_classes=1 + len(new_classes),
            backbone=options.backbone,
            context_channels=options.context_channels,
            embed_channels=options.embed_channels,
        )
        model, old_model, classes, num_old = BiSeNet(config, aux=True), None, ["background", *new_classes], 0
        if options.backbone_weights is not None:
            model.load_backbone_weights(options.backbone_weights)
        history, state = [], {}
    else:
        check_continuation(
            "the base model", base.model.config.sigmoid_outputs, method.name, method.needs_own_base
        )
        model, num_old = copy.deepcopy(base.model), base.model.num_classes
        old_model = _frozen_teacher(base.model).to(device)
        model.add_classes(len(new_classes))
        classes, history, state = [*base.classes, *new_classes], list(base.history), copy.deepcopy(base.state)
    model.to(device)

    loader = DataLoader(
        train_set,
        batch_size=options.batch_size,
        shuffle=True,
        drop_last=len(train_set) > options.batch_size,
        num_workers=options.workers,
        generator=torch.Generator().manual_seed(options.seed),
    )
    if len(train_set) < 2:  # batch norm needs two samples per batch in training
        raise ValueError(f"the step has {len(train_set)} training images; it needs at least 2")
    weak = isinstance(train_set, WeakSegmentationDataset)
    if weak != method.needs_image_labels:
        raise ValueError(
            "image-level labels need the weak term (training.methods.weak.with_weak_labels) and a "
            f"WeakSegmentationDataset together; got {type(train_set).__name__} for {method.name}"
        )
    if weak and old_model is None:
        raise ValueError("step 0 needs masks: image-level labels only train the classes of later steps")
    floor = options.min_iterations if old_model is not None else 0  # step 0 runs its epochs as given
    epochs = epochs_for(options.epochs, len(loader), floor)
    total = epochs * len(loader)
    ctx = StepContext(
        len(history),
        model,
        old_model,
        num_old,
        classes,
        loader,
        device,
        state,
        options.epochs,
        Setting(options.setting),
        total_iterations=total,
    )
    if weak:
        ctx.train_loader = PseudoLabelledLoader(loader, method, ctx)
        ctx.weak_batches = loader
    method.on_step_start(ctx)

    lr = options.learning_rate(ctx.step)
    frozen_norms = method.frozen_batchnorm_layers(model) if old_model is not None else []
    for norm in frozen_norms:
        norm.requires_grad_(False)
    multipliers = resolve_multipliers(
        old_model is not None, *(term.lr_multipliers for term in method.terms), options.lr_multipliers
    )
    optimizer = build_optimizer(model, lr, multipliers, options.momentum, options.weight_decay)
    for term in method.active_terms(ctx):
        for module, multiplier in term.trainable_modules():
            optimizer.add_param_group(
                {"params": list(module.parameters()), "lr": lr * multiplier, "name": term.name}
            )
    row_hooks = scale_new_rows(
        model, num_old, multipliers[ParamGroup.NEW_CLASSES] / multipliers[ParamGroup.CLASSIFIER]
    )
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=0.9)
    use_amp = options.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    iteration = 0
    for epoch in range(epochs):
        model.train()
        for norm in frozen_norms:
            norm.eval()
        for raw in loader:
            if should_stop is not None and should_stop():
                raise StepCancelled(f"cancelled during training (iteration {iteration} of {total})")
            images, labels, image_labels, is_weak = unpack(raw, device)
            ctx.iteration = iteration
            with torch.autocast(device.type, enabled=use_amp):
                out = model.forward_train(images)
                with torch.no_grad():
                    old_out = old_model.forward_train(images) if old_model is not None else None
                losses = method.losses(Batch(images, labels, out, old_out, image_labels, is_weak), ctx)
                loss = torch.stack(list(losses.values())).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {iteration}: {losses}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            last_loss = loss.item()
            if on_progress is not None:
                parts = {name: value.item() for name, value in losses.items()}
                on_progress(StepProgress(epoch, iteration, total, loss.item(), parts))

    for hook in row_hooks:
        hook.remove()
    ctx.iteration = iteration
    begin(END_OF_STEP_PHASE)
    method.on_step_end(ctx)
    scores = None
    if val_set is not None and len(val_set) > 0:
        begin(EVALUATING_PHASE)
        val_loader = DataLoader(val_set, batch_size=options.batch_size, num_workers=options.workers)
        scores = evaluate(model, val_loader, classes, num_old if num_old else len(classes), device)
    metrics = {**(scores.to_dict() if scores else {}), **method.step_metrics()}
    if scores is None and PSEUDO_LABELS_KEY in metrics:
        metrics["note"] = (
            f"no validation masks: no mIoU; {PSEUDO_LABELS_KEY} holds the pseudo-labels' statistics"
        )
    history.append(
        {
            "step": ctx.step,
            "classes_added": list(new_classes),
            "method": method.name,
            "supervision": "weak" if weak else "full",
            "options": options.model_dump(mode="json"),
            "train_images": len(train_set),
            "iterations": total,
            "learning_rates": {group: lr * multiplier for group, multiplier in multipliers.items()},
            "metrics": metrics or None,
            "started_at": started.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "duration_s": round((datetime.now(UTC) - started).total_seconds(), 2),
        }
    )
    model.cpu()
    return ModelBundle(model, classes, history, ctx.state), scores
