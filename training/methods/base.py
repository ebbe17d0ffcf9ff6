"""Incremental methods as small composable loss terms with step hooks.

A method is a list of ``LossTerm`` objects. The trainer calls, for every term,
``on_step_start(ctx)`` once, ``term(batch, ctx)`` every iteration (the result is multiplied by
``term.weight`` and summed with the other terms) and ``on_step_end(ctx)`` after the last
iteration (where replay methods build their memory). Terms keep what must survive the step in
``ctx.state`` (saved in the model directory), never on the trainer.

Call graph of one step::

    train_step
      -> term.on_step_start(ctx)                 for each term
      -> for each batch:
           out = model.forward_train(x); old_out = old_model.forward_train(x)
           loss = sum(term.weight * term(batch, ctx))
      -> term.on_step_end(ctx)                   for each term
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from training.models.bisenet import BiSeNet, SegmentationOutput
from training.optim import ParamGroup
from training.protocols import Setting


@dataclass
class StepContext:
    """What the loss terms may read during one incremental step.

    Attributes:
        step: Index of this step in the model's history (0 = base classes).
        model: The model being trained, already grown to all classes.
        old_model: Frozen model of the previous step (None at step 0).
        num_old_classes: Classes of the previous model, background included (0 at step 0).
        classes: Class names of the new model, in model order.
        train_loader: The step's training data (labels in model indices).
        device: Where the models live.
        state: Persistent method state (e.g. prototypes, feature memory), saved with the model.
        epochs: Training epochs of the step (terms with their own loops may reuse it).
        setting: How the step's images and labels were chosen (``StepOptions.setting``); a method
            whose reference treats the old data per setting (``star``) reads it.
    """

    step: int
    model: BiSeNet
    old_model: BiSeNet | None
    num_old_classes: int
    classes: list[str]
    train_loader: DataLoader
    device: torch.device
    state: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    epochs: int = 1
    setting: Setting = Setting.OVERLAPPED

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def new_class_indices(self) -> range:
        return range(self.num_old_classes, self.num_classes)

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
    """

    images: Tensor
    labels: Tensor
    out: SegmentationOutput
    old_out: SegmentationOutput | None

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
    lr_multipliers: Mapping[ParamGroup, float] = {}

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def on_step_start(self, ctx: StepContext) -> None:
        """Called once before the first iteration of a step."""

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

    def losses(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """Weighted loss per term name; the trainer sums them."""
        return {term.name: term.weight * term(batch, ctx) for term in self.active_terms(ctx)}

    def on_step_end(self, ctx: StepContext) -> None:
        for term in self.terms:
            term.on_step_end(ctx)
