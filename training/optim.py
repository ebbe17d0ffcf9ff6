"""The optimiser of a step: learning rates per parameter group and an iteration budget with a floor.

An incremental step starts from a trained model whose new classifier rows are copies of the
background row (MiB's initialisation), on a dataset where the new classes cover a few percent
of the pixels; at one small learning rate for every parameter those rows never move far enough
from the background row to win a pixel (BENCHMARKS.md "Every step learns its classes"). As DKD
and STAR do, the parts of the model train at their own rates, multiples of the step's ``lr``:

- ``backbone``: the ResNet of the context path (stem and the four stages);
- ``spatial_path``: BiSeNet's spatial path (three stride-2 convolutions reading the image); by
  default at the ``head`` rate (see ``resolve_multipliers``), a group of its own so that a method
  (``star``) or a user can set it apart;
- ``head``: everything else between the backbone and the classifiers (attention refinement,
  fusion, the main and auxiliary embeddings);
- ``classifier``: the rows of the 1x1 classifiers (main and auxiliary) of the classes the model
  knew before the step;
- ``new_classes``: the rows of the classes the step adds.

The classifier is a single ``Conv2d`` (the exported graph does not change), so its old and new
rows share one parameter: it trains in the ``classifier`` group and a gradient hook multiplies
the new rows' gradient by ``new_classes / classifier``. With SGD (momentum is linear in the
gradient) that is exactly a separate learning rate for those rows, weight decay aside (which
stays at the ``classifier`` rate). The trainer removes the hooks when the step ends.

A method states other multipliers through its loss terms (``LossTerm.lr_multipliers``, e.g. the
``star`` method); ``StepOptions.lr_multipliers`` overrides both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from training.models.bisenet import BiSeNet
from training.options import ParamGroup

# Step 0 trains everything at the step's lr (0.01 by default), as MiB does.
BASE_STEP_MULTIPLIERS: dict[ParamGroup, float] = {
    ParamGroup.BACKBONE: 1.0,
    ParamGroup.HEAD: 1.0,
    ParamGroup.CLASSIFIER: 1.0,
    ParamGroup.NEW_CLASSES: 1.0,
}

# Incremental steps (lr 0.001 by default): backbone at lr, heads and old rows 10x, new rows 100x,
# STAR's ratios (jinpeng0528/STAR train_voc.py:123-133: backbone lr, ASPP and old classifier lr x 10,
# new classifier lr x 100), so that the new rows leave the background row within a short step
# (BENCHMARKS.md "Every step learns its classes"). ``spatial_path`` follows ``head`` (below).
INCREMENTAL_STEP_MULTIPLIERS: dict[ParamGroup, float] = {
    ParamGroup.BACKBONE: 1.0,
    ParamGroup.HEAD: 10.0,
    ParamGroup.CLASSIFIER: 10.0,
    ParamGroup.NEW_CLASSES: 100.0,
}

# A group no default or override names takes the multiplier of the group it follows.
FOLLOWS: dict[ParamGroup, ParamGroup] = {ParamGroup.SPATIAL_PATH: ParamGroup.HEAD}

_BACKBONE_PARTS = ("stem", "layer1", "layer2", "layer3", "layer4")
_BACKBONE_PREFIXES = tuple(f"context_path.{part}." for part in _BACKBONE_PARTS)


def group_of(parameter_name: str) -> ParamGroup:
    """The group of a parameter of ``BiSeNet`` by its qualified name (classifier rows: ``classifier``)."""
    if parameter_name.startswith(_BACKBONE_PREFIXES):
        return ParamGroup.BACKBONE
    if parameter_name.startswith("spatial_path."):
        return ParamGroup.SPATIAL_PATH
    if ".classifier." in f".{parameter_name}":
        return ParamGroup.CLASSIFIER
    return ParamGroup.HEAD


def classifiers(model: BiSeNet) -> list[nn.Conv2d]:
    """The main and auxiliary 1x1 classifiers (their rows are the model's classes)."""
    return [head.classifier for head in [model.head, *model.aux_heads]]


def resolve_multipliers(
    incremental: bool, *overrides: Mapping[ParamGroup, float] | Mapping[str, float] | None
) -> dict[ParamGroup, float]:
    """The defaults of the step kind, updated by each mapping in order (later ones win; keys are groups or
    their names).

    A group of ``FOLLOWS`` that no mapping names takes the final multiplier of the group it follows
    (the spatial path trains with the heads unless a method or the user sets it apart).

    Raises:
        ValueError: A multiplier that is not positive.
    """
    multipliers = dict(INCREMENTAL_STEP_MULTIPLIERS if incremental else BASE_STEP_MULTIPLIERS)
    for override in overrides:
        multipliers |= {ParamGroup(group): float(value) for group, value in (override or {}).items()}
    multipliers = {**{group: multipliers[leader] for group, leader in FOLLOWS.items()}, **multipliers}
    bad = {group.value: value for group, value in multipliers.items() if not value > 0}
    if bad:
        raise ValueError(f"learning-rate multipliers must be > 0, got {bad}")
    return multipliers


def build_optimizer(
    model: BiSeNet,
    lr: float,
    multipliers: Mapping[ParamGroup, float],
    momentum: float,
    weight_decay: float,
) -> torch.optim.SGD:
    """SGD over the trainable parameters, one param group per ``ParamGroup`` that has any.

    Each param group carries its ``name`` (a ``ParamGroup`` value) and its ``lr``; the
    ``new_classes`` rate is applied by ``scale_new_rows`` inside the ``classifier`` group.
    """
    grouped: dict[ParamGroup, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grouped.setdefault(group_of(name), []).append(param)
    return torch.optim.SGD(
        [
            {"params": params, "lr": lr * multipliers[group], "name": group.value}
            for group, params in grouped.items()
        ],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=momentum > 0,
    )


def scale_new_rows(model: BiSeNet, num_old: int, factor: float) -> list[RemovableHandle]:
    """Hooks the classifiers so that the gradient of rows ``num_old:`` is multiplied by ``factor``.

    Returns the hooks' handles (remove them when the step ends); none when ``num_old`` is 0
    (step 0) or ``factor`` is 1.
    """
    if num_old == 0 or factor == 1.0:
        return []
    return [
        param.register_hook(_row_scaler(num_old, factor))
        for classifier in classifiers(model)
        for param in (classifier.weight, classifier.bias)
        if param is not None and param.requires_grad
    ]


def _row_scaler(num_old: int, factor: float) -> Callable[[Tensor], Tensor]:
    def scale(grad: Tensor) -> Tensor:  # (C, ...) -> same, rows num_old: times factor
        return torch.cat([grad[:num_old], grad[num_old:] * factor])

    return scale


def epochs_for(epochs: int, iterations_per_epoch: int, min_iterations: int) -> int:
    """Epochs to run: ``epochs``, or more when that would give fewer than ``min_iterations`` iterations."""
    return max(epochs, math.ceil(min_iterations / max(iterations_per_epoch, 1)))
