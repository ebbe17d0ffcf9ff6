"""Class-incremental protocols and settings as validated data (MiB's ``tasks.py`` idea).

A protocol is an ordered list of class groups over a dataset's class indices (1..N; background 0
is implicit in step 0). The model's class order is the protocol's order: model index 0 is
background, then the classes of step 0, step 1, ... in the order given.

Image selection and labels per step (``../shared/DESIGN.md`` section 3, as in MiB/PLOP):
- train images of step t contain at least one pixel of a class of step t;
  *disjoint* also requires that they contain no class of a later step;
- *disjoint* / *overlapped* train labels: classes not of step t become background (0);
  *sequential*: classes of earlier steps keep their labels (same images as disjoint);
- validation at step t: images with at least one seen foreground class, labels of all seen
  classes, every other class -> background; 255 stays ignore everywhere (PLOP's convention).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

IGNORE = 255

# Names the papers use for protocols whose generic reading differs ("15-5s" is 15 then 5 steps of 1).
ALIASES = {"15-5s": "15-1", "10-10s": "10-1"}


class Setting(StrEnum):
    """How images and labels of other steps are treated during training."""

    DISJOINT = "disjoint"
    OVERLAPPED = "overlapped"
    SEQUENTIAL = "sequential"

    @property
    def allows_future_classes(self) -> bool:
        return self is Setting.OVERLAPPED

    @property
    def keeps_old_labels(self) -> bool:
        return self is Setting.SEQUENTIAL


@dataclass(frozen=True)
class Protocol:
    """Ordered class groups; ``steps[0]`` are the base classes (background implicit).

    Attributes:
        name: The spec it was parsed from.
        steps: Dataset class indices (>= 1) per step, disjoint, in learning order.
    """

    name: str
    steps: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.steps or any(not group for group in self.steps):
            raise ValueError(f"protocol {self.name!r}: every step needs at least one class")
        flat = [c for group in self.steps for c in group]
        if any(c < 1 for c in flat):
            raise ValueError(f"protocol {self.name!r}: class 0 is background and implicit in step 0")
        if len(set(flat)) != len(flat):
            raise ValueError(f"protocol {self.name!r}: a class appears in more than one step")

    @classmethod
    def parse(cls, spec: str, num_classes: int) -> Protocol:
        """Parses ``A-B`` (A base classes, then steps of B), ``A-B-C-...`` (explicit step sizes),
        a named spec (``15-5s``) or a JSON list of class-index groups (``[[1,2],[3]]``).

        Args:
            spec: The protocol string.
            num_classes: Foreground classes of the dataset (its class list minus background).

        Raises:
            ValueError: If the spec is malformed or does not fit the dataset's classes.
        """
        text = ALIASES.get(spec.strip(), spec.strip())
        if text.startswith("["):
            try:
                groups = json.loads(text)
                steps = tuple(tuple(int(c) for c in group) for group in groups)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"protocol {spec!r}: expected a JSON list of lists of class indices"
                ) from err
        elif re.fullmatch(r"\d+(-\d+)+", text):
            sizes = [int(s) for s in text.split("-")]
            if any(s < 1 for s in sizes):
                raise ValueError(f"protocol {spec!r}: step sizes must be >= 1")
            if len(sizes) == 2 and sizes[0] < num_classes:  # A-B: steps of B until every class is learned
                sizes = [sizes[0]] + [sizes[1]] * math.ceil((num_classes - sizes[0]) / sizes[1])
            bounds = np.minimum(np.cumsum([0, *sizes]), num_classes)
            if bounds[-2] >= num_classes:
                raise ValueError(f"protocol {spec!r} needs more than the dataset's {num_classes} classes")
            steps = tuple(tuple(range(int(lo) + 1, int(hi) + 1)) for lo, hi in itertools.pairwise(bounds))
        else:
            raise ValueError(f"protocol {spec!r}: use A-B (e.g. 15-1), A-B-C..., 15-5s or [[1,2],[3]]")
        protocol = cls(spec, steps)
        if max(c for group in protocol.steps for c in group) > num_classes:
            raise ValueError(f"protocol {spec!r}: class index above the dataset's {num_classes} classes")
        return protocol

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def order(self) -> list[int]:
        """Dataset class indices in model order, background first."""
        return [0, *(c for group in self.steps for c in group)]

    def seen(self, step: int) -> list[int]:
        """Dataset classes known after ``step`` (background included), in model order."""
        return [0, *(c for group in self.steps[: step + 1] for c in group)]

    def future(self, step: int) -> set[int]:
        return {c for group in self.steps[step + 1 :] for c in group}


def label_lut(mapping: dict[int, int]) -> np.ndarray:
    """256-entry uint8 look-up table: dataset label -> model label; unmapped -> 0, 255 -> 255."""
    lut = np.zeros(256, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    lut[IGNORE] = IGNORE
    return lut


def train_indices(
    label_sets: Sequence[frozenset[int]], protocol: Protocol, step: int, setting: Setting
) -> list[int]:
    """Indices of the training images used at ``step``."""
    current = set(protocol.steps[step])
    future = protocol.future(step)
    return [
        i
        for i, labels in enumerate(label_sets)
        if labels & current and (setting.allows_future_classes or not labels & future)
    ]


def train_lut(protocol: Protocol, step: int, setting: Setting) -> np.ndarray:
    """Training label map at ``step``: dataset label -> model label."""
    order = protocol.order()
    kept = protocol.seen(step) if setting.keeps_old_labels else [0, *protocol.steps[step]]
    return label_lut({c: order.index(c) for c in kept})


def val_indices(label_sets: Sequence[frozenset[int]], protocol: Protocol, step: int) -> list[int]:
    """Indices of the validation images used at ``step`` (those with a seen foreground class)."""
    seen = set(protocol.seen(step)) - {0}
    return [i for i, labels in enumerate(label_sets) if labels & seen]


def val_lut(protocol: Protocol, step: int) -> np.ndarray:
    """Validation label map at ``step``: seen classes keep their model index, others -> 0."""
    order = protocol.order()
    return label_lut({c: order.index(c) for c in protocol.seen(step)})
