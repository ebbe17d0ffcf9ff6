"""``incseg step``: one incremental step on a dataset folder, matching classes by name.

This is the library function the CLI and the service's worker both call. The dataset's class
names decide what the step learns: names the base model already knows keep their index, the
others are appended (the model grows). ``base=None`` trains step 0.
"""

from __future__ import annotations

from pathlib import Path

from training.data import (
    SegmentationDataset,
    SegmentationSource,
    eval_transform,
    label_sets,
    read_source,
    train_transform,
)
from training.methods import build_method
from training.metrics import SegmentationScores
from training.model_dir import ModelBundle
from training.protocols import label_lut
from training.trainer import ProgressCallback, StepOptions, train_step


def plan_step(source: SegmentationSource, known: list[str]) -> tuple[list[str], dict[int, int]]:
    """Matches a dataset's classes to a model's by name.

    Args:
        source: The dataset (its class 0 is background whatever its name).
        known: The base model's classes (``["background"]`` for step 0).

    Returns:
        The new class names (in dataset order) and the map dataset index -> new model index.

    Raises:
        ValueError: If the dataset adds no class the model does not already know.
    """
    new = [name for name in source.classes[1:] if name not in known]
    if not new:
        raise ValueError(
            f"{source.root}: every class of the dataset ({', '.join(source.classes[1:])}) is already known "
            "to the model; a step must add at least one new class"
        )
    index = {name: i for i, name in enumerate([*known, *new])}
    mapping = {0: 0} | {i: index[name] for i, name in enumerate(source.classes) if i > 0}
    return new, mapping


def run_step(
    base_dir: Path | None,
    data_dir: Path,
    method: str,
    options: StepOptions,
    out_dir: Path,
    on_progress: ProgressCallback | None = None,
) -> tuple[ModelBundle, SegmentationScores | None]:
    """Trains one step on a dataset folder and writes the new model directory.

    Training uses the images that contain a new class; classes the model already knows are
    labelled background unless ``options.setting`` is ``sequential``. Validation (the dataset's
    val split, if any) keeps every class's label; old = classes of the base model.

    Returns:
        The saved bundle and its validation scores (None without a val split).
    """
    method_obj = build_method(method)  # fail on a bad name before reading anything
    source = read_source(Path(data_dir))
    base = ModelBundle.load(base_dir, aux=True) if base_dir is not None else None
    known = base.classes if base is not None else ["background"]
    new, mapping = plan_step(source, known)
    new_indices = {mapping[i] for i in range(1, len(source.classes)) if source.classes[i] in new}
    num_source = len(source.classes)
    keep_old = options.setting == "sequential"
    train_map = {src: dst for src, dst in mapping.items() if dst in new_indices or keep_old or dst == 0}

    sets = label_sets(source.train, num_source, source.label_map)
    new_sources = {i for i, name in enumerate(source.classes) if name in new}
    train_samples = [s for s, labels in zip(source.train, sets, strict=True) if labels & new_sources]
    train_set = SegmentationDataset(
        train_samples, num_source, label_lut(train_map), train_transform(options.size), source.label_map
    )
    val_set = (
        SegmentationDataset(
            source.val, num_source, label_lut(mapping), eval_transform(options.size), source.label_map
        )
        if source.val
        else None
    )
    bundle, scores = train_step(base, new, train_set, val_set, method_obj, options, on_progress)
    bundle.save(out_dir)
    return bundle, scores
