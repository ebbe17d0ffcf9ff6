"""``run_step`` on a dataset folder: step 0, then a step that adds classes by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from incseg.cli import build_parser
from training.data import DataError, DatasetReport, Sample, SegmentationSource
from training.model_dir import ModelBundle
from training.protocols import Setting
from training.step import CHECKING_DATA_PHASE, plan_step, run_step
from training.trainer import StepOptions, StepProgress


def subset(src: Path, dst: Path, keep: list[str]) -> Path:
    """A copy of ``src`` whose classes.txt lists only ``keep`` (other classes' pixels -> background)."""
    from PIL import Image

    shutil.copytree(src, dst)
    names = (src / "classes.txt").read_text().split()
    lut = np.zeros(256, dtype=np.uint8)
    lut[255] = 255
    for new_index, name in enumerate(["background", *keep]):
        lut[names.index(name)] = new_index
    for mask in (dst / "masks").glob("*.png"):
        Image.fromarray(lut[np.array(Image.open(mask))]).save(mask)
    (dst / "classes.txt").write_text("\n".join(["background", *keep]) + "\n")
    return dst


def test_base_then_incremental_step(synth_dataset: Path, tmp_path: Path, tiny_options: StepOptions) -> None:
    names = (synth_dataset / "classes.txt").read_text().split()
    first = subset(synth_dataset, tmp_path / "first", names[1:4])
    # the second dataset names an old class too: it keeps its index, the others are appended
    second = subset(synth_dataset, tmp_path / "second", [names[5], names[2], names[6]])

    base, scores = run_step(None, first, "ft", tiny_options, tmp_path / "v1")
    assert base.classes == ["background", *names[1:4]] and scores is not None
    assert scores.miou_new is None and scores.miou_all is not None and 0 <= scores.miou_all <= 1

    progress: list[StepProgress] = []
    grown, scores = run_step(tmp_path / "v1", second, "mib", tiny_options, tmp_path / "v2", progress.append)
    assert grown.classes == ["background", *names[1:4], names[5], names[6]]
    assert grown.model.num_classes == 6
    assert [h["classes_added"] for h in grown.history] == [names[1:4], [names[5], names[6]]]
    assert grown.history[-1]["method"] == "mib" and grown.history[-1]["metrics"]["miou_all"] is not None
    training = [report for report in progress if report.phase == "training"]
    assert training and training[-1].fraction == 1.0 and "unbiased_kd" in training[-1].losses
    assert progress[0].phase == CHECKING_DATA_PHASE and progress[-1].phase == "saving"
    loaded = ModelBundle.load(tmp_path / "v2")
    assert loaded.classes == grown.classes and loaded.version == 2


def test_step_without_new_classes_is_refused(synth_dataset: Path, tmp_path: Path, tiny_options) -> None:
    run_step(None, synth_dataset, "ft", tiny_options, tmp_path / "v1")
    with pytest.raises(ValueError, match="already known"):
        run_step(tmp_path / "v1", synth_dataset, "mib", tiny_options, tmp_path / "v2")
    assert not (tmp_path / "v2").exists()


def test_unknown_method_fails_before_training(synth_dataset: Path, tmp_path: Path, tiny_options) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        run_step(None, synth_dataset, "mibb", tiny_options, tmp_path / "v1")


def _report(classes: tuple[str, ...], train: list[set[int]], val: list[set[int]], new: tuple[str, ...]):
    """A DatasetReport over listed (not written) samples: plan_step reads only the labels."""

    def samples(split: str, count: int) -> tuple[Sample, ...]:
        return tuple(
            Sample(f"{split}{i}", Path(f"{split}{i}.png"), Path(f"{split}{i}_mask.png")) for i in range(count)
        )

    source = SegmentationSource(Path("d"), classes, samples("train", len(train)), samples("val", len(val)))
    unused = tuple(name for name in classes[1:] if name not in new and name not in ("cat", "dog"))
    return DatasetReport(source, tuple(map(frozenset, train)), tuple(map(frozenset, val)), new, unused)


def test_plan_step_selects_images_and_labels_per_setting() -> None:
    # dataset: 1 dog (known, model index 2), 2 car (new), 3 bus (fixed-list class with no training pixel)
    report = _report(
        ("background", "dog", "car", "bus"), [{0, 1}, {0, 2}, {1, 2}, {0}], [{0, 1, 2, 3}], new=("car",)
    )
    known = ["background", "cat", "dog"]
    plans = {setting: plan_step(report, known, setting) for setting in Setting}
    for plan in plans.values():
        assert plan.new_classes == ["car"]
        assert [s.stem for s in plan.train_samples] == ["train1", "train2"]  # the images showing car
        assert plan.val_lut[:4].tolist() == [0, 2, 3, 255] and plan.val_lut[255] == 255
    # one step on a user's dataset has no class of a later step: disjoint and overlapped are the same step
    assert plans[Setting.DISJOINT].train_samples == plans[Setting.OVERLAPPED].train_samples
    assert np.array_equal(plans[Setting.DISJOINT].train_lut, plans[Setting.OVERLAPPED].train_lut)
    assert plans[Setting.OVERLAPPED].train_lut[:4].tolist() == [0, 0, 3, 255]  # known dog -> background
    assert plans[Setting.SEQUENTIAL].train_lut[:4].tolist() == [0, 2, 3, 255]  # known dog keeps its label


def test_step_help_says_disjoint_equals_overlapped(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["step", "--help"])
    assert "disjoint differs only by dropping images of later steps' classes" in " ".join(
        capsys.readouterr().out.split()
    )


def test_new_class_without_pixels_fails_before_training(
    synth_dataset: Path, tmp_path: Path, tiny_options: StepOptions
) -> None:
    """Used to end in torch's "num_samples=0" (no pixel in any image) or add a class with IoU None forever."""
    names = (synth_dataset / "classes.txt").read_text().split()
    first = subset(synth_dataset, tmp_path / "first", names[1:4])
    run_step(None, first, "ft", tiny_options, tmp_path / "v1")
    again = subset(synth_dataset, tmp_path / "again", names[1:4])
    (again / "classes.txt").write_text("\n".join(["background", *names[1:4], "unicorn"]) + "\n")
    progress: list[StepProgress] = []
    with pytest.raises(DataError, match="line 5: new class 'unicorn' \\(mask value 4\\) has no pixel"):
        run_step(tmp_path / "v1", again, "mib", tiny_options, tmp_path / "v2", progress.append)
    assert [report.phase for report in progress] == [CHECKING_DATA_PHASE] and not (tmp_path / "v2").exists()


def test_bad_validation_image_fails_before_training(
    synth_dataset: Path, tmp_path: Path, tiny_options: StepOptions
) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    (data / "images" / "val_00003.png").write_bytes(b"not an image")
    progress: list[StepProgress] = []
    with pytest.raises(DataError, match=r"val_00003\.png: cannot read image"):
        run_step(None, data, "ft", tiny_options, tmp_path / "v1", progress.append)
    assert [report.phase for report in progress] == [CHECKING_DATA_PHASE] and not (tmp_path / "v1").exists()
