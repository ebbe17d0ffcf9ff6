"""One small end-to-end benchmark run: results.json schema, table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.bench import format_table, plot_results, run_benchmark, write_results
from training.model_dir import ModelBundle


def test_small_bench_end_to_end(synth_dataset: Path, tmp_path: Path, tiny_options) -> None:
    done = []
    results = run_benchmark(
        synth_dataset,
        "4-1",
        "overlapped",
        ["ft", "mib", "joint"],
        tiny_options,
        save_dir=tmp_path / "models",
        log=lambda _: None,
        on_method_done=lambda partial: done.append(list(partial["methods"])),
    )
    assert done == [["ft"], ["ft", "mib"], ["ft", "mib", "joint"]]  # partial results after each method
    write_results(results, tmp_path / "results.json")
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["protocol"] == "4-1" and loaded["setting"] == "overlapped"
    assert set(loaded["methods"]) == {"ft", "mib", "joint"}
    mib = loaded["methods"]["mib"]
    assert [s["step"] for s in mib["steps"]] == [0, 1, 2]
    last = mib["steps"][-1]
    assert len(last["classes"]) == 7 and set(last["per_class_iou"]) == set(last["classes"])
    for key in ("miou_old", "miou_new", "miou_all"):
        assert 0.0 <= mib["final"][key] <= 1.0
    assert mib["steps"][0]["miou_new"] is None  # nothing is new at step 0
    for step in mib["steps"][1:]:  # each step's own classes, scored right after it
        added = step["classes_added"]
        assert len(added) == 1 and step["miou_step"] == step["per_class_iou"][added[0]]
        assert step["seconds"] > 0 and step["iterations"] == step["train_images"] // 4  # batch 4, 1 epoch
    assert last["image_bytes"] > mib["steps"][0]["image_bytes"] > 0
    assert [s["step"] for s in loaded["methods"]["joint"]["steps"]] == [2]
    # ft and mib start from the same step-0 model
    assert loaded["methods"]["ft"]["steps"][0]["miou_all"] == mib["steps"][0]["miou_all"]
    assert ModelBundle.load(tmp_path / "models" / "mib" / "step2").version == 3
    table = format_table(loaded)
    assert table.splitlines()[0].split()[:4] == ["method", "old", "new", "all"] and "mib" in table
    assert plot_results(loaded, tmp_path / "plot.png").stat().st_size > 1000


def test_bad_protocol_fails_before_training(synth_dataset: Path, tiny_options) -> None:
    with pytest.raises(ValueError, match="more than the dataset"):
        run_benchmark(synth_dataset, "15-1", "overlapped", ["mib"], tiny_options, log=lambda _: None)
    with pytest.raises(ValueError, match="unknown method"):
        run_benchmark(synth_dataset, "4-1", "overlapped", ["mibb"], tiny_options, log=lambda _: None)
