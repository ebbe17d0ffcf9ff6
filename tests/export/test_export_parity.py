"""The parity gate: passes a faithful export, refuses a broken one with the numbers, keeps old exports."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export import cli, onnx_export
from export.onnx_export import export_onnx
from export.parity import ParityError, check_parity, compare_logits, parity_inputs, require_parity
from tests.helpers import save_tiny_model
from training.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from training.model_dir import ModelBundle

SIZE = (64, 80)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("export-parity") / "model", ["background", "a", "b"])


@pytest.fixture(scope="module")
def exported(model_dir: Path):
    return export_onnx(model_dir, model_dir.parent / "export", SIZE)


@pytest.fixture(scope="module")
def inputs() -> list[np.ndarray]:
    return parity_inputs(SIZE, (1, 2), IMAGENET_MEAN, IMAGENET_STD)


def test_parity_inputs_are_deterministic_synthetic_batches(inputs: list[np.ndarray]) -> None:
    again = parity_inputs(SIZE, (1, 2), IMAGENET_MEAN, IMAGENET_STD)
    assert [batch.shape for batch in inputs] == [(1, 3, *SIZE), (2, 3, *SIZE)]
    assert all(np.array_equal(a, b) for a, b in zip(inputs, again, strict=True))
    assert inputs[0].std() > 0.1  # real image content, not a blank canvas


def test_faithful_export_passes(exported, model_dir: Path, inputs: list[np.ndarray]) -> None:
    model = ModelBundle.load(model_dir).model
    report = require_parity(check_parity(model, exported.onnx_path, inputs))
    assert report.passed and report.max_abs_error <= 1e-3 and report.argmax_agreement >= 0.999
    assert [item.batch for item in report.per_batch] == [1, 2]


def test_perturbed_classifier_bias_is_refused(exported, model_dir: Path, inputs, tmp_path: Path) -> None:
    model = ModelBundle.load(model_dir).model.eval()
    with torch.inference_mode():
        predicted = model(torch.from_numpy(inputs[1])).argmax(1).flatten()
    rarest = int(torch.bincount(predicted, minlength=3).argmin())
    proto = onnx.load(str(exported.onnx_path))
    (bias,) = [init for init in proto.graph.initializer if init.name.endswith("classifier.bias")]
    values = numpy_helper.to_array(bias).copy()
    values[rarest] += 5.0  # the rarest class now wins everywhere
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))

    report = check_parity(model, broken, inputs)
    assert not report.passed
    assert report.max_abs_error == pytest.approx(5.0, abs=1e-3)
    assert report.argmax_agreement < 0.999
    with pytest.raises(ParityError) as raised:
        require_parity(report)
    message = str(raised.value)
    assert raised.value.report is report
    assert f"{report.max_abs_error:.3e}" in message and "1.0e-03" in message
    assert f"{100 * report.argmax_agreement:.3f} %" in message and "99.90 %" in message


def test_compare_logits_gates_independently() -> None:
    reference = np.zeros((1, 2, 4, 4), np.float32)
    reference[:, 0] = 1.0
    close = reference + 1e-4
    assert compare_logits([reference], [close], 1e-3, 0.999, "a", "b").passed
    assert not compare_logits([reference], [close], 1e-5, 0.999, "a", "b").passed
    flipped = reference.copy()
    flipped[0, 1, 0, 0] = 2.0  # one pixel of 16 changes class
    report = compare_logits([reference], [flipped], None, 0.9, "a", "b")
    assert report.argmax_agreement == pytest.approx(15 / 16) and report.passed


def test_the_logit_tolerance_is_relative_to_the_logit_scale() -> None:
    """float32 rounding grows with the logits: 2e-3 apart at logits of 4000 is 5e-7 of them (passes);
    the same 2e-3 at logits of 1 or less is over 1e-3 (fails); the scale never goes below 1."""
    large = np.full((1, 2, 4, 4), -4000.0, np.float32)
    large[:, 0] = 4000.0
    report = compare_logits([large], [large + 2e-3], 1e-3, 0.999, "a", "b")
    assert report.logit_scale == pytest.approx(4000.0) and report.passed
    assert "logit scale 4e+03" in report.summary()
    assert not compare_logits([large], [large + 5.0], 1e-3, 0.999, "a", "b").passed  # 1.25e-3 of 4000
    small = np.zeros((1, 2, 4, 4), np.float32)
    small[:, 0] = 0.5
    tight = compare_logits([small], [small + 2e-3], 1e-3, 0.999, "a", "b")
    assert tight.logit_scale == 1.0 and not tight.passed


def test_failed_export_keeps_the_old_directory(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(ParityError, match="parity gate failed"):
        export_onnx(model_dir, out, SIZE, parity_batches=(1,), max_abs_tol=-1.0)
    assert (out / "old.txt").read_text() == "previous export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # no temporary left behind


def test_cli_export_exits_nonzero_on_parity_failure(
    model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    def strict_export(*args, **kwargs):
        return export_onnx(*args, **{**kwargs, "max_abs_tol": -1.0, "parity_batches": (1,)})

    monkeypatch.setattr(onnx_export, "export_onnx", strict_export)  # the command imports it when it runs
    parser = argparse.ArgumentParser()
    cli.add_subcommands(parser.add_subparsers())
    args = parser.parse_args(
        ["export", "--model", str(model_dir), "--size", "64x80", "--out", str(tmp_path / "x")]
    )
    assert args.func(args) == 1
    error = capsys.readouterr().err
    assert "parity gate failed" in error and "max abs logit error" in error
    assert not (tmp_path / "x").exists()
