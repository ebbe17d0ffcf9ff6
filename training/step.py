"""``incseg step``: one incremental step on a dataset folder, matching classes by name.

This is the library function the CLI and the service's worker both call. The dataset's class
names decide what the step learns: names the base model already knows keep their index, the
others are appended (the model grows). ``base=None`` trains step 0.

The whole dataset, train and val, is checked (``training.data.validate_dataset``) before the model
is built, so a bad file fails in seconds with a message naming it, the same from the CLI and the API.

Settings for one step (``training.protocols`` defines them for a protocol of many steps):
- *overlapped* and *disjoint*: classes the model already knows are labelled background in the
  training masks. They differ only in whether training images may show classes of *later* steps,
  and one step on a user's dataset has none: every class the dataset lists is either known, new, or
  (fixed VOC/ADE20K lists only) absent from every training image. So the two give the same data
  here; ``star`` still weighs its replay by the setting, as STAR's trainer does
  (``training.methods.star.SETTING_FORMULAS``).
- *sequential*: known classes keep their labels in the training masks (same images).

Image-level labels (a ``labels.csv``, ``DatasetReport.supervision == "weak"``): the step trains with the
method plus WILSON's weak term (``training.methods.weak``; masks are used where they exist) and its record
says ``supervision: weak``. Step 0 needs masks. Validation uses the val images that have masks; when none
has, the step reports no mIoU and its metrics hold the pseudo-labels' own statistics
(``metrics["pseudo_labels"]``, also present when there are masks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import (
    IGNORE,
    DatasetReport,
    Sample,
    SegmentationDataset,
    WeakSegmentationDataset,
    eval_transform,
    read_source,
    train_transform,
    validate_dataset,
)
from training.methods import build_method
from training.methods.weak import with_weak_labels
from training.metrics import SegmentationScores
from training.model_dir import ModelBundle
from training.protocols import Setting, label_lut
from training.trainer import (
    SAVING_PHASE,
    ProgressCallback,
    StepOptions,
    StepProgress,
    StopCheck,
    train_step,
)

CHECKING_DATA_PHASE = "checking-data"  # reported before the dataset pass, ahead of the trainer's phases


@dataclass(frozen=True)
class StepPlan:
    """What one step trains on, in the new model's class indices.

    Attributes:
        new_classes: Names of the classes the step adds, in dataset order (= their new model indices).
        train_samples: Training images that show at least one new class.
        train_lut: uint8 (256,) dataset label -> training label (known classes -> 0 unless sequential).
        val_lut: uint8 (256,) dataset label -> model label for validation (every class the model will know).
    """

    new_classes: list[str]
    train_samples: list[Sample]
    train_lut: np.ndarray
    val_lut: np.ndarray


def plan_step(report: DatasetReport, known: list[str], setting: Setting) -> StepPlan:
    """Matches a validated dataset's classes to a model's by name and selects the training images.

    Args:
        report: The dataset as :func:`training.data.validate_dataset` checked it against ``known``.
        known: The base model's classes (``["background"]`` for step 0).
        setting: How known classes are labelled in training (see the module docstring).

    Returns:
        The step's new classes, training images and label tables.
    """
    classes = report.source.classes
    model_index = {name: i for i, name in enumerate([*known, *report.new_classes])}
    # Dataset class 0 is background whatever its name; classes left out of the step are ignored.
    mapping = {0: 0} | {i: model_index.get(name, IGNORE) for i, name in enumerate(classes) if i > 0}
    new_indices = report.new_indices
    keep = {
        0,
        *new_indices,
        *(i for i, name in enumerate(classes) if setting.keeps_old_labels and name in known),
    }
    train_map = {src: dst if src in keep or dst == IGNORE else 0 for src, dst in mapping.items()}
    return StepPlan(
        new_classes=list(report.new_classes),
        train_samples=[
            sample
            for sample, labels in zip(report.source.train, report.train_labels, strict=True)
            if labels & new_indices
        ],
        train_lut=label_lut(train_map),
        val_lut=label_lut(mapping),
    )


def run_step(
    base_dir: Path | None,
    data_dir: Path,
    method: str,
    options: StepOptions,
    out_dir: Path,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[ModelBundle, SegmentationScores | None]:
    """Checks the dataset, trains one step on it and writes the new model directory.

    Training uses the images that contain a new class; classes the model already knows are
    labelled background unless ``options.setting`` is ``sequential``. Validation (the dataset's
    val split, if any) keeps every class's label; old = classes of the base model.

    ``on_progress`` and ``should_stop`` go to :func:`training.trainer.train_step`; the checking-data
    phase (the pass over every image and mask) and the saving phase are reported here.

    Returns:
        The saved bundle and its validation scores (None without a val split or without val masks; a
        step with image-level labels then records its pseudo-labels' statistics instead).

    Raises:
        StepCancelled: ``should_stop`` returned True (nothing is written).
        DataError: When the dataset fails :func:`training.data.validate_dataset` (before any training).
        ValueError: On an unknown method, or image-level labels at step 0 ("step 0 needs masks: ...").
    """
    method_obj = build_method(method)  # fail on a bad name before reading anything
    source = read_source(Path(data_dir))
    base = ModelBundle.load(base_dir, aux=True) if base_dir is not None else None
    known = base.classes if base is not None else ["background"]
    if on_progress is not None:
        on_progress(StepProgress(0, 0, 0, float("nan"), {}, CHECKING_DATA_PHASE))
    report = validate_dataset(source, known)
    if report.supervision == "weak" and base is None:
        raise ValueError(
            f"step 0 needs masks: {data_dir} gives image-level labels (labels.csv) for training images; "
            "train the base classes from masks, then add classes from labels"
        )
    plan = plan_step(report, known, Setting(options.setting))
    num_source = len(source.classes)
    train_set: SegmentationDataset | WeakSegmentationDataset
    if report.supervision == "weak":
        method_obj = with_weak_labels(method_obj)
        num_labels = len(known) + len(plan.new_classes)
        train_set = WeakSegmentationDataset(
            plan.train_samples,
            num_source,
            plan.train_lut,
            num_labels,
            train_transform(options.size),
            source.label_map,
        )
    else:
        train_set = SegmentationDataset(
            plan.train_samples, num_source, plan.train_lut, train_transform(options.size), source.label_map
        )
    masked_val = [sample for sample in source.val if not sample.is_weak]  # weak val images cannot be scored
    val_set = (
        SegmentationDataset(
            masked_val, num_source, plan.val_lut, eval_transform(options.size), source.label_map
        )
        if masked_val
        else None
    )
    reports: list[StepProgress] = []  # the last one, to report the saving phase with its figures

    def relay(progress: StepProgress) -> None:
        reports[:] = [progress]
        if on_progress is not None:
            on_progress(progress)

    bundle, scores = train_step(
        base,
        plan.new_classes,
        train_set,
        val_set,
        method_obj,
        options,
        relay if on_progress else None,
        should_stop,
    )
    if on_progress is not None:
        on_progress(dataclasses.replace(reports[-1], losses={}, phase=SAVING_PHASE))
    bundle.save(out_dir)
    return bundle, scores
