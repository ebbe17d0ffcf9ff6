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


def test_directories_readable_and_no_leftovers_with_concurrent_writers(tmp_path) -> None:
    """Two threads replacing one path many times: none fails, the result is whole, no temp dirs remain."""
    import threading

    errors: list[BaseException] = []

    def write(num_classes: int) -> None:
        try:
            for _ in range(15):
                bundle(num_classes).save(tmp_path / "m")
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=write, args=(n,)) for n in (3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ModelBundle.load(tmp_path / "m").model.num_classes in (3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "m" / "state").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.pop("classes"), r"model\.json: classes: Field required"),
        (lambda m: m["config"].update(width=3), r"model\.json: config: .*unknown key\(s\) width"),
        (lambda m: m.update(format=7), r"model\.json: format: Input should be 1"),
        (lambda m: m["classes"].append("extra"), r"model\.json: .*4 class names for config\.num_classes = 3"),
        (lambda m: m["config"].update(backbone="vgg"), r"model\.json: config: unknown backbone 'vgg'"),
        (lambda m: m["classes"].__setitem__(2, m["classes"][1]), r"model\.json: .*classes repeat \["),
    ],
)
def test_damaged_model_json_names_the_file(tmp_path, damage, message) -> None:
    bundle().save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    damage(meta)
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        ModelBundle.load(tmp_path / "m")


def test_truncated_files_name_themselves(tmp_path) -> None:
    bundle().save(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text('{"format": 1, "conf')
    with pytest.raises(ValueError, match=r"model\.json: .*Invalid JSON"):
        ModelBundle.load(tmp_path / "m")
    bundle().save(tmp_path / "m")
    weights = tmp_path / "m" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"weights\.pt: cannot be read .* truncated"):
        ModelBundle.load(tmp_path / "m")
    bundle().save(tmp_path / "m")
    (tmp_path / "m" / "state" / "prototypes.pt").unlink()
    with pytest.raises(ValueError, match=r"prototypes\.pt: missing"):
        ModelBundle.load(tmp_path / "m")


def test_weights_of_another_config(tmp_path) -> None:
    bundle(3).save(tmp_path / "m")
    bundle(4).save(tmp_path / "other")
    (tmp_path / "other" / "weights.pt").replace(tmp_path / "m" / "weights.pt")
    with pytest.raises(ValueError, match=r"weights\.pt: does not fit the config of model\.json"):
        ModelBundle.load(tmp_path / "m")
