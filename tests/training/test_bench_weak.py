"""``incseg bench --supervision full,weak``: rows share step 0, weak rows score their pseudo-labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.bench import run_benchmark
from training.trainer import StepOptions


def test_full_and_weak_rows_share_step_zero(synth_dataset: Path, tiny_options: StepOptions) -> None:
    results = run_benchmark(
        synth_dataset,
        "4-2",
        "overlapped",
        ["mib"],
        tiny_options,
        log=lambda _: None,
        supervisions=["full", "weak"],
    )
    full, weak = results["methods"]["mib"], results["methods"]["mib [weak]"]
    assert full["steps"][0] == weak["steps"][0]  # one step 0 for both rows
    assert "pseudo_miou" not in full["steps"][1]
    step = weak["steps"][1]
    assert 0 <= step["pseudo_miou"] <= 1 and 0 <= step["pseudo_miou_new"] <= 1
    assert set(step["pseudo_iou"]) == {"background", *step["classes_added"]}
    assert step["pseudo_label_stats"]["images"] > 0
    assert results["supervisions"] == ["full", "weak"]


def test_unknown_supervision_fails_before_training(synth_dataset: Path, tiny_options: StepOptions) -> None:
    with pytest.raises(ValueError, match="supervision"):
        run_benchmark(synth_dataset, "4-2", "overlapped", ["mib"], tiny_options, supervisions=["pixels"])
    with pytest.raises(ValueError, match="every class at once"):
        run_benchmark(synth_dataset, "4-2", "overlapped", ["joint"], tiny_options, supervisions=["weak"])
