from __future__ import annotations

import json

import pytest
import torch

from training.model_dir import ModelBundle, is_model_dir
from training.models.bisenet import BiSeNet, BiSeNetConfig


def bundle(num_classes: int = 3) -> ModelBundle:
    model = BiSeNet(BiSeNetConfig(num_classes, "resnet10", 16, 16), aux=True)
    names = ["background", *[f"c{i}" for i in range(1, num_classes)]]
    return ModelBundle(model, names, [{"step": 0}], {"prototypes": {"p": torch.arange(6.0).reshape(3, 2)}})


def test_round_trip_with_and_without_aux(tmp_path) -> None:
    original = bundle()
    original.model.add_classes(2)
    original.classes += ["d", "e"]
    original.save(tmp_path / "m")
    assert is_model_dir(tmp_path / "m")
    for aux in (True, False):
        loaded = ModelBundle.load(tmp_path / "m", aux=aux)
        assert loaded.classes == original.classes and loaded.history == [{"step": 0}]
        assert loaded.model.num_classes == 5 and len(loaded.model.aux_heads) == (2 if aux else 0)
        torch.testing.assert_close(loaded.state["prototypes"]["p"], original.state["prototypes"]["p"])
        x = torch.randn(1, 3, 40, 40)
        torch.testing.assert_close(loaded.model.eval()(x), original.model.eval()(x))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["config"]["num_classes"] == 5


def test_save_replaces_atomically(tmp_path) -> None:
    bundle(3).save(tmp_path / "m")
    bundle(4).save(tmp_path / "m")
    assert ModelBundle.load(tmp_path / "m").model.num_classes == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers


def test_class_count_must_match() -> None:
    with pytest.raises(ValueError, match="class names"):
        ModelBundle(BiSeNet(BiSeNetConfig(3, "resnet10", 16, 16)), ["background"])


def test_not_a_model_dir(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        ModelBundle.load(tmp_path)
