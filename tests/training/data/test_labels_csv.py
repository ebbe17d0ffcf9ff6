"""labels.csv: image-level labels (weak supervision) read by the folder reader and checked by validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    DataError,
    Sample,
    load_mask,
    read_ade20k,
    read_folder_dataset,
    read_voc,
    validate_dataset,
)

CLASSES = "background\ncat\ndog\nbird\n"
KNOWN = ["background", "cat", "bird"]  # the step adds dog


def _mask(inner: int, side: int = 16) -> np.ndarray:
    """Background with a square of class ``inner`` framed by an ignore band."""
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[2:14, 2:14] = 255
    mask[3:13, 3:13] = inner
    return mask


def _dataset(
    root: Path,
    labels: str | None,
    masks: dict[str, int] | None = None,
    train: tuple[str, ...] = ("a", "b", "c"),
    val: tuple[str, ...] = (),
    classes: str = CLASSES,
) -> Path:
    """A project-format folder: images for ``train`` + ``val``, masks for ``masks`` (stem -> class),
    ``labels.csv`` with the text ``labels`` (none when None) and split files."""
    for folder in ("images", "masks", "splits"):
        (root / folder).mkdir(parents=True)
    (root / "classes.txt").write_text(classes)
    rng = np.random.default_rng(0)
    for stem in (*train, *val):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "images" / f"{stem}.png"
        )
    for stem, inner in (masks or {}).items():
        Image.fromarray(_mask(inner)).save(root / "masks" / f"{stem}.png")
    if labels is not None:
        (root / "labels.csv").write_text(labels)
    (root / "splits" / "train.txt").write_text("".join(f"{stem}\n" for stem in train))
    (root / "splits" / "val.txt").write_text("".join(f"{stem}\n" for stem in val))
    return root


def test_rows_give_class_sets_by_name_separated_by_semicolons(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "image,labels\na,cat;dog\nb, bird ; cat \nc,\n")
    source = read_folder_dataset(root)
    assert [(s.stem, s.mask_path, s.image_labels, s.is_weak) for s in source.train] == [
        ("a", None, frozenset({1, 2}), True),
        ("b", None, frozenset({3, 1}), True),
        ("c", None, frozenset(), True),  # an empty field: none of the classes
    ]


def test_quoted_fields_a_bom_blank_lines_and_background_are_accepted(tmp_path: Path) -> None:
    labels = '\ufeffImage,Labels\n"a","cat;background"\n\nb,dog;\nc,background\n'
    source = read_folder_dataset(_dataset(tmp_path / "d", labels))
    assert [s.image_labels for s in source.train] == [frozenset({1}), frozenset({2}), frozenset()]


def test_masks_and_rows_mix_and_masks_win(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path / "d", "image,labels\na,bird\nb,dog\nv,cat\n", masks={"a": 1, "c": 2}, val=("v",)
    )
    source = read_folder_dataset(root)
    a, b, c = source.train
    assert a == Sample("a", root / "images" / "a.png", root / "masks" / "a.png")  # its row (bird) is ignored
    assert b == Sample("b", root / "images" / "b.png", None, frozenset({2}))
    assert not c.is_weak and c.image_labels is None
    assert source.val[0].image_labels == frozenset({1})  # a val split may be weak too
    report = validate_dataset(source, KNOWN)
    assert report.train_labels == (frozenset({0, 1}), frozenset({2}), frozenset({0, 2}))
    assert report.val_labels == (frozenset({1}),)
    assert report.supervision == "weak" and report.new_classes == ("dog",)


def test_masks_only_is_full_supervision_and_weak_val_does_not_make_a_weak_step(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "image,labels\nv,cat\n", masks={"a": 1, "b": 2, "c": 2}, val=("v",))
    report = validate_dataset(read_folder_dataset(root), KNOWN)
    assert report.supervision == "full" and report.source.val[0].is_weak


def test_weak_samples_give_their_labels_to_the_report_and_their_image_is_still_decoded(
    tmp_path: Path,
) -> None:
    root = _dataset(tmp_path / "d", "image,labels\na,cat;dog\nb,dog\nc,\n")
    report = validate_dataset(read_folder_dataset(root), KNOWN)
    assert report.train_labels == (frozenset({1, 2}), frozenset({2}), frozenset())
    assert report.supervision == "weak" and report.new_indices == {2}
    (root / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="b.png: cannot read image"):
        validate_dataset(read_folder_dataset(root), KNOWN)


def test_load_mask_refuses_a_weak_sample(tmp_path: Path) -> None:
    sample = Sample("a", tmp_path / "a.png", None, frozenset({1}))
    with pytest.raises(DataError, match=r"a\.png: has image-level labels only \(labels.csv\), no mask"):
        load_mask(sample, 3)


@pytest.mark.parametrize("image_labels", [None, frozenset({1})])
def test_a_sample_has_a_mask_or_image_labels_never_both_nor_neither(tmp_path: Path, image_labels) -> None:
    mask = None if image_labels is None else tmp_path / "a_mask.png"
    with pytest.raises(ValueError, match="exactly one of mask_path and image_labels"):
        Sample("a", tmp_path / "a.png", mask, image_labels)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            "image,labels\na,cat\nb,dgo\n",
            "line 3: unknown class 'dgo' \\(did you mean 'dog'\\?\\); use names of",
        ),
        (
            "image,labels\na,cat\nb,dog\na,bird\n",
            "line 4: image 'a' already has a row \\(line 2\\); keep one row",
        ),
        (
            "image,labels\na,cat\nb,dog\nc,\nzz,cat\n",
            "line 5: no image 'zz' in .*images .*remove the row or add",
        ),
        ("image,labels\na.png,cat\n", "line 2: no image 'a.png' .*write the stem 'a' without the suffix"),
        (
            "image,labels\na,cat,dog\n",
            "line 2: 3 fields; a row is '<image stem>,<labels>'; separate the classes",
        ),
        ("image\na\n", "line 1: header is 'image'; the first line must be 'image,labels'"),
        ("stem,classes\na,cat\n", "line 1: header is 'stem,classes'; the first line must be 'image,labels'"),
        ("", "line 1: header is ''; the first line must be 'image,labels'"),
    ],
)
def test_each_row_error_names_the_file_and_line(tmp_path: Path, labels: str, message: str) -> None:
    root = _dataset(tmp_path / "d", labels)
    with pytest.raises(DataError, match=message) as caught:
        read_folder_dataset(root)
    assert caught.value.path == root / "labels.csv"


def test_an_image_with_neither_a_row_nor_a_mask_is_named(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "image,labels\na,cat\nc,dog\n", masks={"c": 2})
    with pytest.raises(
        DataError, match="image 'b' .*b.png\\) has no row here and no mask .*b.png; add a row 'b,"
    ) as caught:
        read_folder_dataset(root)
    assert caught.value.path == root / "labels.csv"


def test_without_labels_csv_a_missing_mask_is_still_the_mask_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", None, masks={"a": 1, "b": 2})
    with pytest.raises(DataError, match="the mask .*c.png is missing; add it or remove the image"):
        read_folder_dataset(root)


def test_a_new_class_that_no_image_carries_names_the_class_list_line(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "image,labels\na,cat\nb,cat\nc,\n")
    carried_by_none = "is carried by no training image \\(no pixel in a mask, no labels.csv row names it\\)"
    with pytest.raises(
        DataError, match=f"line 3: new class 'dog' \\(mask value 2\\) {carried_by_none}"
    ) as caught:
        validate_dataset(read_folder_dataset(root), KNOWN)
    assert caught.value.path == root / "classes.txt"


def test_a_new_class_in_one_labelled_image_only_is_refused(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "image,labels\na,cat\nb,cat;dog\nc,\n", classes="background\ncat\ndog\n")
    with pytest.raises(DataError, match="only 1 training image shows a new class \\(dog\\)"):
        validate_dataset(read_folder_dataset(root), ["background", "cat"])


def test_voc_and_ade_readers_ignore_a_labels_csv_and_give_full_samples(tmp_path: Path) -> None:
    voc = tmp_path / "VOC2012"
    ade = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for image, mask in (
        (voc / "JPEGImages" / "2007_a.jpg", voc / "SegmentationClass" / "2007_a.png"),
        (
            ade / "images" / "training" / "ADE_train_1.jpg",
            ade / "annotations" / "training" / "ADE_train_1.png",
        ),
    ):
        for path in (image, mask):
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
        Image.fromarray(_mask(1)).save(mask)
        (image.parent.parent / "labels.csv").write_text("image,labels\n2007_a,cat\n")
    (ade / "images" / "validation").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_a\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    for source in (read_voc(voc, aug=False), read_ade20k(ade)):
        assert [(s.is_weak, s.image_labels) for s in source.train] == [(False, None)]
        assert load_mask(source.train[0], len(source.classes), source.label_map)[8, 8] == 1


def test_a_file_that_is_no_utf8_or_no_csv_is_a_clear_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "image,labels\na,cat\n")
    (root / "labels.csv").write_bytes(b"image,labels\na,c\xe9t\n")  # Latin-1
    with pytest.raises(DataError, match="labels.csv: not UTF-8 text .*save it as UTF-8"):
        read_folder_dataset(root)
    (root / "labels.csv").write_text(
        "image,labels\na,cat\nb," + "x" * 200_000 + "\n"
    )  # over csv's field limit
    with pytest.raises(DataError, match="labels.csv: line 3: field larger than field limit"):
        read_folder_dataset(root)
