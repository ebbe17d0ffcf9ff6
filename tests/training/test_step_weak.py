"""Weak steps (image-level labels) through ``run_step`` and ``incseg step``: the history's supervision, the
scores or the pseudo-labels' statistics, and the clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from incseg.cli import main
from tests.helpers import base_only, to_weak
from training.data import WeakSegmentationDataset, eval_transform, read_source
from training.methods import build_method
from training.model_dir import ModelBundle, supervision_of
from training.protocols import label_lut
from training.step import run_step
from training.trainer import StepOptions, train_step

TINY = ["--epochs", "1", "--size", "48", "--batch-size", "4", "--backbone", "resnet10"]
TINY += ["--context-channels", "16", "--embed-channels", "16", "--min-iterations", "0"]


@pytest.mark.parametrize("method", ["mib", "star"])
def test_two_step_weak_run_through_incseg_step(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    base_data = base_only(synth_dataset, tmp_path / "base", 4)
    weak_data = to_weak(synth_dataset, tmp_path / "weak")
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    step = ["step", "--method", method, *TINY]
    assert main([*step, "--base", "none", "--data", str(base_data), "--out", str(v1)]) == 0
    capsys.readouterr()
    assert main([*step, "--base", str(v1), "--data", str(weak_data), "--out", str(v2)]) == 0
    printed = capsys.readouterr().err
    assert "mIoU old" in printed  # val has masks: scored as a full step
    bundle = ModelBundle.load(v2)
    first, second = bundle.history
    assert first["supervision"] == "full" and second["supervision"] == "weak"
    assert bundle.classes == (synth_dataset / "classes.txt").read_text().split()
    metrics = second["metrics"]
    assert metrics["miou_all"] is not None
    stats = metrics["pseudo_labels"]
    assert stats["images"] > 0 and len(stats["pixel_fraction"]) == len(bundle.classes)
    assert sum(stats["pixel_fraction"][1:5]) == 0  # old classes are background in training labels


def test_weak_step_without_val_masks_reports_pseudo_label_statistics(
    synth_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_data = base_only(synth_dataset, tmp_path / "base", 4)
    weak_data = to_weak(synth_dataset, tmp_path / "weak", splits=("train", "val"))
    step = ["step", "--method", "mib", *TINY]
    assert main([*step, "--base", "none", "--data", str(base_data), "--out", str(tmp_path / "v1")]) == 0
    capsys.readouterr()
    out = ["--base", str(tmp_path / "v1"), "--data", str(weak_data), "--out", str(tmp_path / "v2")]
    assert main([*step, *out]) == 0
    printed = capsys.readouterr().err
    assert "no validation masks" in printed and "mIoU old" not in printed
    metrics = ModelBundle.load(tmp_path / "v2").history[-1]["metrics"]
    assert set(metrics) == {"pseudo_labels", "note"} and "no validation masks" in metrics["note"]


def test_weak_step_zero_is_a_clear_error(
    synth_dataset: Path, tmp_path: Path, tiny_options: StepOptions
) -> None:
    weak_data = to_weak(synth_dataset, tmp_path / "weak")
    with pytest.raises(ValueError, match="step 0 needs masks"):
        run_step(None, weak_data, "mib", tiny_options, tmp_path / "v1")
    assert not (tmp_path / "v1").exists()


def test_weak_data_needs_the_weak_term(synth_dataset: Path, tiny_options: StepOptions) -> None:
    source = read_source(synth_dataset)
    lut = label_lut({0: 0, 1: 1})
    dataset = WeakSegmentationDataset(source.train[:4], len(source.classes), lut, 2, eval_transform(48))
    with pytest.raises(ValueError, match="weak term"):
        train_step(None, ["a"], dataset, None, build_method("mib"), tiny_options)


def test_records_before_weak_steps_read_as_full() -> None:
    assert supervision_of({"step": 0}) == "full"
    assert supervision_of({"supervision": "weak"}) == "weak"
