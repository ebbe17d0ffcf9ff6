"""Incremental methods as small composable loss terms with step hooks.

A method is a list of ``LossTerm`` objects. The trainer calls, for every term,
``on_step_start(ctx)`` once, ``term(batch, ctx)`` every iteration (the result is multiplied by
``term.weight`` and summed with the other terms) and ``on_step_end(ctx)`` after the last
iteration (where replay methods build their memory). Before the terms are called, each term may
``prepare`` the batch (the weak-label term writes its pseudo-labels into ``batch.labels`` there, so
every other term reads them), may bring modules of its own for the optimiser (``trainable_modules``)
and may report figures of the step (``step_metrics``). Terms keep what must survive the step in
``ctx.state`` (saved in the model directory), never on the trainer.

Call graph of one step::

    train_step
      -> term.on_step_start(ctx)                 for each term
      -> for each batch:
           out = model.forward_train(x); old_out = old_model.forward_train(x)
           batch = term.prepare(batch, ctx)      for each term, in order
           loss = sum(term.weight * term(batch, ctx))
      -> term.on_step_end(ctx)                   for each term
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from training.data.dataset import WeakItem
from training.models.bisenet import BiSeNet, SegmentationOutput
from training.optim import ParamGroup
from training.protocols import Setting


class TrainLoader(Protocol):
    """What the step hooks iterate: (images (B, 3, H, W), labels (B, H, W)) batches, with a length.

    A ``DataLoader`` of pairs, or for data with image-level labels the trainer's view of its loader that
    gives the weak images their pseudo-labels (``training.trainer.PseudoLabelledLoader``).
    """

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...


@dataclass
class StepContext:
    """What the loss terms may read during one incremental step.

    Attributes:
        step: Index of this step in the model's history (0 = base classes).
        model: The model being trained, already grown to all classes.
        old_model: Frozen model of the previous step (None at step 0).
        num_old_classes: Classes of the previous model, background included (0 at step 0).
        classes: Class names of the new model, in model order.
        train_loader: The step's training data (labels in model indices; weak images pseudo-labelled).
        device: Where the models live.
        state: Persistent method state (e.g. prototypes, feature memory), saved with the model.
        epochs: Training epochs of the step (terms with their own loops may reuse it).
        setting: How the step's images and labels were chosen (``StepOptions.setting``); a method
            whose reference treats the old data per setting (``star``) reads it.
        iteration: Iterations done so far in the step (the trainer updates it; the step-end hooks
            see the total).
        total_iterations: Iterations of the whole step (0 until the trainer knows it).
        weak_batches: In a step with image-level labels, its loader of ``WeakItem`` batches as the
            trainer reads it (image labels and weak flags included), for a term that trains on them
            before the first iteration (the weak term's localizer warm-up); None otherwise.
    """

    step: int
    model: BiSeNet
    old_model: BiSeNet | None
    num_old_classes: int
    classes: list[str]
    train_loader: TrainLoader
    device: torch.device
    state: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    epochs: int = 1
    setting: Setting = Setting.OVERLAPPED
    iteration: int = 0
    total_iterations: int = 0
    weak_batches: Iterable[WeakItem] | None = None

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def new_class_indices(self) -> range:
        return range(self.num_old_classes, self.num_classes)

    def mask_loader(self) -> DataLoader:
        """The step's loader of (image, mask) pairs, for hooks that reload its dataset themselves (ALIFE).

        Raises:
            ValueError: In a step with image-level labels, whose loader pseudo-labels the weak images.
        """
        if not isinstance(self.train_loader, DataLoader):
            raise ValueError(
                "this method reloads the step's masks itself and cannot train from image-level labels; "
                "use star or mib for a step with labels.csv"
            )
        return self.train_loader

    def require_old_model(self) -> BiSeNet:
        """The previous step's model, for the terms and hooks that only run after step 0.

        Raises:
            ValueError: At step 0, which has no previous model.
        """
        if self.old_model is None:
            raise ValueError("this loss term needs the previous step's model; step 0 has none")
        return self.old_model


@dataclass
class Batch:
    """One training iteration: inputs, labels and both models' outputs.

    Attributes:
        images: (B, 3, H, W) normalised images.
        labels: (B, H, W) model class indices, 255 = ignore.
        out: Current model's ``forward_train`` output.
        old_out: Frozen previous model's output (None at step 0).
        image_labels: (B, C) float multi-hot of the classes each image shows, in the step's training
            label space (index 0 = background, always 0); only for data with image-level labels
            (``training.data.WeakItem``), else None.
        weak: (B,) bool, True for the images without a mask (their ``labels`` are 255 until a term's
            ``prepare`` writes pseudo-labels); None with ``image_labels``.
    """

    images: Tensor
    labels: Tensor
    out: SegmentationOutput
    old_out: SegmentationOutput | None
    image_labels: Tensor | None = None
    weak: Tensor | None = None

    def require_old_out(self) -> SegmentationOutput:
        """The previous model's output, for the ``needs_old_model`` terms (run only after step 0).

        Raises:
            ValueError: At step 0, which has no previous model.
        """
        if self.old_out is None:
            raise ValueError("this loss term needs the previous model's output; step 0 has none")
        return self.old_out


class LossTerm:
    """One weighted loss of a method, with optional step hooks.

    Subclasses implement ``__call__`` and set ``name``; ``needs_old_model`` terms are skipped at
    step 0 (distillation has nothing to distil from); a method has exactly one ``classifies`` term
    (the supervised loss on the step's labels). A ``needs_own_base`` term cannot start from a step 0
    trained by another method (e.g. STAR's per-class sigmoids): a benchmark trains that method's step 0
    with the method itself. ``lr_multipliers`` (group -> multiple of the
    step's lr, see ``training.optim``) changes the learning rates of incremental steps for a
    method that needs its own; the trainer merges them over the method's terms.
    """

    name: str = "loss"
    needs_old_model: bool = False
    classifies: bool = False
    needs_own_base: bool = False
    needs_image_labels: bool = False
    lr_multipliers: Mapping[ParamGroup, float] = {}

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def on_step_start(self, ctx: StepContext) -> None:
        """Called once before the first iteration of a step."""

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """Called every iteration before any term's ``__call__``; returns the batch the terms read."""
        return batch

    def hook_labels(self, batch: Batch, ctx: StepContext) -> Tensor | None:
        """The labels the step hooks see for this batch (None: the batch's own); no side effects."""
        return None

    def trainable_modules(self) -> list[tuple[torch.nn.Module, float]]:
        """Modules of the term's own that the step's optimiser trains, each with its multiple of the
        step's lr (read after ``on_step_start``, which builds them)."""
        return []

    def step_metrics(self) -> dict[str, Any]:
        """Figures of the step to record with its metrics (read after ``on_step_end``)."""
        return {}

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def on_step_end(self, ctx: StepContext) -> None:
        """Called once after the last iteration of a step (before evaluation and saving)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight:g})"


def over_heads(batch: Batch, loss: Callable[[Tensor], Tensor]) -> Tensor:
    """Applies a classification loss to the main logits and each auxiliary head (weight 1.0 each)."""
    return torch.stack([loss(logits) for logits in [batch.out.logits, *batch.out.aux_logits]]).sum()


@dataclass
class Method:
    """A named combination of loss terms (e.g. ``mib+sdr``).

    Attributes:
        name: The spec it was built from.
        terms: Loss terms, summed by the trainer.
        trains_all_classes_at_once: True for joint training (the upper bound), which the
            benchmark runs as a single step over every class.
        freeze_batchnorm: Keep BatchNorm statistics and affine parameters fixed in incremental
            steps (ALIFE's ``FREEZE_TYPE: step1``), so the old classes' features do not drift with
            batches made of the new classes' images.
        batchnorm_modules: Names of the submodules (``model.get_submodule``) whose BatchNorm layers
            ``freeze_batchnorm`` freezes; ``""`` is the whole model.
    """

    name: str
    terms: list[LossTerm]
    trains_all_classes_at_once: bool = False
    freeze_batchnorm: bool = False
    batchnorm_modules: tuple[str, ...] = ("",)

    def frozen_batchnorm_layers(self, model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
        """The BatchNorm layers to hold fixed in an incremental step (none unless ``freeze_batchnorm``)."""
        if not self.freeze_batchnorm:
            return []
        layers = {
            id(m): m
            for name in self.batchnorm_modules
            for m in model.get_submodule(name).modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        }
        return list(layers.values())

    @property
    def needs_own_base(self) -> bool:
        """True when step 0 must be trained by this method itself, not shared with other methods."""
        return any(term.needs_own_base for term in self.terms)

    def active_terms(self, ctx: StepContext) -> Iterable[LossTerm]:
        return [t for t in self.terms if ctx.old_model is not None or not t.needs_old_model]

    def on_step_start(self, ctx: StepContext) -> None:
        for term in self.terms:
            term.on_step_start(ctx)

    @property
    def needs_image_labels(self) -> bool:
        """True when a term reads ``Batch.image_labels`` (the data must be ``training.data.WeakItem``)."""
        return any(term.needs_image_labels for term in self.terms)

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """The batch after every active term's ``prepare``, in order."""
        for term in self.active_terms(ctx):
            batch = term.prepare(batch, ctx)
        return batch

    def hook_labels(self, batch: Batch, ctx: StepContext) -> Tensor:
        """The labels the step hooks read for ``batch``: the first term's that gives any, else the batch's."""
        for term in self.active_terms(ctx):
            labels = term.hook_labels(batch, ctx)
            if labels is not None:
                return labels
        return batch.labels

    def losses(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """Weighted loss per term name, on the prepared batch; the trainer sums them."""
        batch = self.prepare(batch, ctx)
        return {term.name: term.weight * term(batch, ctx) for term in self.active_terms(ctx)}

    def step_metrics(self) -> dict[str, Any]:
        """The terms' ``step_metrics``, merged."""
        return {key: value for term in self.terms for key, value in term.step_metrics().items()}

    def on_step_end(self, ctx: StepContext) -> None:
        for term in self.terms:
            term.on_step_end(ctx)
