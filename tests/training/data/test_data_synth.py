"""Synthetic dataset: determinism, class coverage, ignore bands, distinct class appearance."""

import colorsys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    label_sets,
    load_mask,
    masks_to_image_labels,
    read_folder_dataset,
    validate_dataset,
    write_synthetic_dataset,
)
from training.data.synth import MAX_CLASSES, SCENES, SHAPES, class_styles


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def _arrays(root: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    source = read_folder_dataset(root)
    samples = source.train if split == "train" else source.val
    return [(np.asarray(Image.open(s.image_path)), load_mask(s, len(source.classes))) for s in samples]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = _files(write_synthetic_dataset(tmp_path / "a", 4, 5, 3, 48, seed=7))
    assert first == _files(write_synthetic_dataset(tmp_path / "b", 4, 5, 3, 48, seed=7))
    other = _files(write_synthetic_dataset(tmp_path / "c", 4, 5, 3, 48, seed=8))
    assert first.keys() == other.keys() and first["images/train_00000.png"] != other["images/train_00000.png"]
    assert first["classes.txt"].decode().splitlines()[0] == "background"
    assert first["splits/val.txt"].decode().split() == ["val_00000", "val_00001", "val_00002"]


@pytest.mark.parametrize(("num_classes", "size"), [(12, 32), (30, 64)])
def test_every_class_appears_in_splits_of_num_classes_images(
    tmp_path: Path, num_classes: int, size: int
) -> None:
    root = write_synthetic_dataset(tmp_path / "d", num_classes, num_classes, num_classes, size, seed=1)
    source = read_folder_dataset(root)
    for samples in (source.train, source.val):
        assert set().union(*label_sets(samples, num_classes + 1)) == set(range(num_classes + 1))


def _band_core_fraction(band: np.ndarray) -> float:
    """Share of band pixels whose 8 neighbours are all band too (0 for a band 2 px wide, ~0.5 at 4 px)."""
    padded = np.pad(band, 1)
    core = band.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            core &= padded[1 + dy : 1 + dy + band.shape[0], 1 + dx : 1 + dx + band.shape[1]]
    return float(core[band].mean())


@pytest.mark.parametrize(("size", "core_range"), [(128, (0.0, 0.15)), (256, (0.3, 0.7))])
def test_objects_are_framed_by_an_ignore_band_scaled_with_size(
    tmp_path: Path, size: int, core_range: tuple[float, float]
) -> None:
    root = write_synthetic_dataset(tmp_path / "e", 6, 8, 0, size, seed=2)
    for _, labels in _arrays(root, "train"):
        for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
            assert not ((a != b) & (a != 255) & (b != 255)).any()  # labels never touch without 255 between
        band = labels == 255
        assert 0.005 < band.mean() < 0.25
        assert core_range[0] <= _band_core_fraction(band) <= core_range[1]


def test_class_names_and_looks_are_unique_combinations() -> None:
    for num_classes in range(1, MAX_CLASSES + 1):
        styles = class_styles(num_classes)
        assert len({s.name for s in styles}) == num_classes
        assert len({(s.shape, s.texture, s.name.split("_")[0]) for s in styles}) == num_classes
    first = class_styles(len(SHAPES))
    assert len({s.shape for s in first}) == len(SHAPES) and len({s.texture for s in first}) == 4
    assert first[0].name == "red_circle_plain"


def test_class_pixels_show_their_hue_and_texture(tmp_path: Path) -> None:
    num_classes = 10
    styles = class_styles(num_classes)
    root = write_synthetic_dataset(tmp_path / "f", num_classes, 30, 0, 64, seed=3)
    style_hues = np.array([colorsys.rgb_to_hsv(*(c / 255 for c in s.rgb))[0] for s in styles])
    spread: dict[int, list[float]] = {label: [] for label in range(1, num_classes + 1)}
    colours: dict[int, list[np.ndarray]] = {label: [] for label in range(1, num_classes + 1)}
    for image, labels in _arrays(root, "train"):
        for label in set(np.unique(labels).tolist()) - {0, 255}:
            pixels = image[labels == label].astype(float)  # (N, 3)
            if len(pixels) >= 30:
                spread[label].append(float(pixels.mean(axis=1).std()))
                colours[label].append(pixels.mean(axis=0))
    for label, style in enumerate(styles, start=1):
        hue = colorsys.rgb_to_hsv(*(np.mean(colours[label], axis=0) / 255))[0]
        distance = np.abs((style_hues - hue + 0.5) % 1.0 - 0.5)
        assert int(distance.argmin()) == label - 1, style.name
        textured_spread = np.median(spread[label])
        assert (textured_spread < 12) if style.texture == "plain" else (textured_spread > 18), style.name
    background = np.concatenate([image[labels == 0] for image, labels in _arrays(root, "train")]).astype(
        float
    )
    saturation = (background.max(axis=1) - background.min(axis=1)) / np.maximum(background.max(axis=1), 1)
    assert np.median(saturation) < 0.3  # clutter is grey-ish; classes are saturated (0.85)


def test_arguments_are_validated(tmp_path: Path) -> None:
    for kwargs, message in (
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": MAX_CLASSES + 1}, "num_classes"),
        ({"size": 31}, "size"),
        ({"num_train": 0}, "num_train"),
        ({"scene": "forest"}, "scene"),
    ):
        arguments = {"num_classes": 3, "num_train": 2, "num_val": 1, "size": 32, "seed": 0} | kwargs
        with pytest.raises(ValueError, match=message):
            write_synthetic_dataset(tmp_path / "g", **arguments)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(tmp_path / "h", 3, 2, 1, 32, 0)


def test_clutter_scene_has_other_classes_more_objects_and_filled_grey_clutter(tmp_path: Path) -> None:
    clutter = SCENES["clutter"]
    names = [style.name for style in class_styles(32, clutter)]
    shapes = {name.split("_", 1)[1].rsplit("_", 1)[0] for name in names}  # hue_shape_texture
    assert len(set(names)) == 32 and shapes == set(clutter.shapes) and not shapes & set(SHAPES)
    root = write_synthetic_dataset(tmp_path / "c", 8, 24, 0, 64, seed=1, scene="clutter")
    assert (root / "classes.txt").read_text().splitlines()[1:] == names[:8]
    shapes_root = write_synthetic_dataset(tmp_path / "s", 8, 24, 0, 64, seed=1)
    objects = [len(set(np.unique(labels)) - {0, 255}) for _, labels in _arrays(root, "train")]
    shapes_objects = [len(set(np.unique(labels)) - {0, 255}) for _, labels in _arrays(shapes_root, "train")]
    assert np.mean(objects) > np.mean(shapes_objects) and max(objects) <= clutter.objects[1]

    # filled grey clutter: more background pixels far from the blotchy base grey than in the tables' scenes
    def background_spread(root: Path) -> float:
        return float(np.mean([image[labels == 0].std() for image, labels in _arrays(root, "train")]))

    assert background_spread(root) > background_spread(shapes_root)


def test_weak_train_writes_labels_csv_from_the_masks_and_keeps_val_masks(tmp_path: Path) -> None:
    full = read_folder_dataset(write_synthetic_dataset(tmp_path / "full", 5, 8, 4, 48, seed=4))
    weak_root = write_synthetic_dataset(tmp_path / "weak", 5, 8, 4, 48, seed=4, weak_train=True)
    weak = read_folder_dataset(weak_root)
    assert (
        not list((weak_root / "masks").glob("train_*"))
        and len(list((weak_root / "masks").glob("val_*"))) == 4
    )
    assert all(sample.is_weak for sample in weak.train) and not any(sample.is_weak for sample in weak.val)
    shown = [labels - {0} for labels in label_sets(full.train, 6)]
    assert [sample.image_labels for sample in weak.train] == shown and all(shown)
    assert [s.image_path.read_bytes() for s in weak.train] == [s.image_path.read_bytes() for s in full.train]
    first_row = (weak_root / "labels.csv").read_text().splitlines()[1]
    assert first_row == "train_00000," + ";".join(full.classes[index] for index in sorted(shown[0]))
    report = validate_dataset(weak, [*full.classes[:3]])
    assert report.supervision == "weak" and report.new_classes == full.classes[3:]


def test_masks_to_image_labels_keeps_existing_rows_and_refuses_a_second_row(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "d", 3, 4, 0, 32, seed=0)
    masks_to_image_labels(root, ["train_00000"])
    masks_to_image_labels(root, ["train_00002"])
    source = read_folder_dataset(root)
    assert [sample.is_weak for sample in source.train] == [True, False, True, False]
    with pytest.raises(ValueError, match="'train_00000' already has a row"):
        masks_to_image_labels(root, ["train_00000"])
