"""``run_step`` on a dataset folder: step 0, then a step that adds classes by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training.model_dir import ModelBundle
from training.step import run_step
from training.trainer import StepOptions


def subset(src: Path, dst: Path, keep: list[str]) -> Path:
    """A copy of ``src`` whose classes.txt lists only ``keep`` (other classes' pixels -> background)."""
    import numpy as np
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
    assert scores.miou_new is None and 0 <= scores.miou_all <= 1

    progress = []
    grown, scores = run_step(tmp_path / "v1", second, "mib", tiny_options, tmp_path / "v2", progress.append)
    assert grown.classes == ["background", *names[1:4], names[5], names[6]]
    assert grown.model.num_classes == 6
    assert [h["classes_added"] for h in grown.history] == [names[1:4], [names[5], names[6]]]
    assert grown.history[-1]["method"] == "mib" and grown.history[-1]["metrics"]["miou_all"] is not None
    assert progress and progress[-1].fraction == 1.0 and "unbiased_kd" in progress[-1].losses
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
