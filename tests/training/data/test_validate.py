"""validate_dataset: the whole dataset, train and val, checked in one pass before a step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import DataError, label_sets, read_source, validate_dataset, write_synthetic_dataset
from training.data.sources import VOC_CLASSES


def _square(label: int, side: int = 16) -> np.ndarray:
    """Background with a square of ``label`` framed by an ignore band."""
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[2:14, 2:14] = 255
    mask[3:13, 3:13] = label
    return mask


def folder_dataset(root: Path, classes: list[str], train: list[np.ndarray], val: list[np.ndarray]) -> Path:
    """A project-format dataset whose masks are given (images are noise of the mask's size)."""
    for folder in ("images", "masks", "splits"):
        (root / folder).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)
    for split, masks in (("train", train), ("val", val)):
        stems = [f"{split}{index}" for index in range(len(masks))]
        for stem, mask in zip(stems, masks, strict=True):
            pixels = rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"{stem}.png")
            Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        (root / "splits" / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in stems))
    return root


CLASSES = ["background", "cat", "dog"]


def test_report_holds_the_labels_of_every_mask_and_the_new_classes(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synth", num_classes=3, num_train=6, num_val=3, size=32, seed=0)
    source = read_source(root)
    report = validate_dataset(source, ["background", source.classes[2]])
    assert list(report.train_labels) == label_sets(source.train, 4)
    assert list(report.val_labels) == label_sets(source.val, 4)
    assert report.new_classes == (source.classes[1], source.classes[3]) and report.unused_classes == ()
    assert report.new_indices == {1, 3}


def test_every_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = folder_dataset(tmp_path / "d", CLASSES, [_square(1), _square(2)], [_square(1)])
    opened: Counter[str] = Counter()
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *args: opened.update([str(path)]) or real_open(path))
    validate_dataset(read_source(root), ["background"])
    assert len(opened) == 6 and set(opened.values()) == {1}  # 3 images + 3 masks, each once


def test_no_new_class(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", CLASSES, [_square(1), _square(2)], [])
    with pytest.raises(DataError, match="every class of the dataset .* is already known") as caught:
        validate_dataset(read_source(root), CLASSES)
    assert caught.value.path == root / "classes.txt"


def test_new_class_without_any_pixel_names_the_class(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", [*CLASSES, "bird"], [_square(1), _square(2)], [_square(1)])
    with pytest.raises(
        DataError, match="line 4: new class 'bird' \\(mask value 3\\) has no pixel in any mask"
    ):
        validate_dataset(read_source(root), ["background"])


def test_new_class_only_in_validation(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", CLASSES, [_square(1), _square(1)], [_square(2)])
    with pytest.raises(DataError, match="new class 'dog' .* appears only in validation images") as caught:
        validate_dataset(read_source(root), ["background", "cat"])
    assert caught.value.path == root / "classes.txt"


def test_known_class_without_pixels_is_fine(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", CLASSES, [_square(2), _square(2)], [])
    assert validate_dataset(read_source(root), ["background", "cat"]).new_classes == ("dog",)


def test_too_few_training_images_with_a_new_class(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", CLASSES, [_square(1), _square(2), _square(2)], [])
    with pytest.raises(DataError, match="only 1 training image shows a new class \\(cat\\); .* at least 2"):
        validate_dataset(read_source(root), ["background", "dog"])


def test_no_training_split(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", CLASSES, [], [_square(1), _square(2)])
    with pytest.raises(DataError, match="no training images"):
        validate_dataset(read_source(root), ["background"])


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda root: (root / "images" / "val0.png").write_bytes(b"junk"),
            r"images/val0\.png: cannot read image",
        ),
        (
            lambda root: Image.fromarray(np.zeros((8, 16), np.uint8)).save(root / "masks" / "val0.png"),
            r"masks/val0\.png: mask is 16x8 but image .*val0\.png is 16x16",
        ),
        (
            lambda root: Image.fromarray(_square(9)).save(root / "masks" / "val0.png"),
            r"masks/val0\.png: label 9 is not a class index \(0\.\.2\)",
        ),
    ],
)
def test_validation_split_is_checked_before_training(tmp_path: Path, corrupt, message: str) -> None:
    root = folder_dataset(tmp_path / "d", CLASSES, [_square(1), _square(2)], [_square(1)])
    corrupt(root)
    with pytest.raises(DataError, match=message):
        validate_dataset(read_source(root), ["background"])


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "d", CLASSES, [_square(1), _square(2)], [])
    assert validate_dataset(read_source(root), ["background"], max_image_pixels=256).new_classes == (
        "cat",
        "dog",
    )
    with pytest.raises(DataError, match=r"train0\.png: image has 16x16 pixels, more than the 255 allowed"):
        validate_dataset(read_source(root), ["background"], max_image_pixels=255)


def test_fixed_class_list_leaves_absent_classes_out(tmp_path: Path) -> None:
    """VOC lists 20 classes; a subset dataset adds the ones its training images show."""
    voc = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    for stem, label in (("a", 1), ("b", 15), ("c", 15), ("v", 7)):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        Image.fromarray(_square(label)).save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nc\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("v\n")
    report = validate_dataset(read_source(voc), ["background"])
    assert report.new_classes == ("aeroplane", "person")
    assert len(report.unused_classes) == 18 and "car" in report.unused_classes  # car (7) only in val
    assert set(report.unused_classes) | set(report.new_classes) == set(VOC_CLASSES[1:])
