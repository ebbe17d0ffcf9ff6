"""Dataset readers, file validation and the torch Dataset, on small trees built in tmp_path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    DataError,
    Sample,
    SegmentationDataset,
    eval_transform,
    label_sets,
    load_image,
    load_mask,
    read_ade20k,
    read_folder_dataset,
    read_source,
    read_voc,
    write_synthetic_dataset,
)


def _save_image(path: Path, width: int = 20, height: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _save_mask(path: Path, labels: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = labels.astype(np.uint8)
    if palette:
        image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
        # Colours unrelated to the indices: the reader must return palette indices, not colours.
        image.putpalette([(7 * i + 3) % 256 for i in range(768)])
    else:
        image = Image.fromarray(labels)
    image.save(path)
    return path


def _labels(height: int = 16, width: int = 20, inner: int = 1) -> np.ndarray:
    """Background with one object of class ``inner`` framed by a 255 band, as in VOC masks."""
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[3:12, 4:15] = 255
    labels[4:11, 5:14] = inner
    return labels


def _folder_dataset(
    root: Path, stems: tuple[str, ...] = ("a", "b"), classes: str = "background\ncat\ndog\n"
) -> Path:
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    for index, stem in enumerate(stems):
        _save_image(root / "images" / f"{stem}.png", seed=index)
        _save_mask(root / "masks" / f"{stem}.png", _labels(inner=index % 2 + 1))
    return root


def test_folder_format_round_trip_via_synth(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synth", num_classes=3, num_train=6, num_val=3, size=32, seed=0)
    source = read_source(root)
    assert source.classes[0] == "background" and len(source.classes) == 4
    assert [s.stem for s in source.train] == [f"train_{i:05d}" for i in range(6)]
    assert [s.stem for s in source.val] == [f"val_{i:05d}" for i in range(3)]
    assert source.label_map is None
    mask = load_mask(source.train[0], num_classes=4)
    assert mask.dtype == np.uint8 and mask.shape == (32, 32)
    assert load_image(source.train[0].image_path).size == (32, 32)
    assert set().union(*label_sets(source.train, num_classes=4)) == {0, 1, 2, 3}


def test_folder_without_splits_puts_every_stem_in_train(tmp_path: Path) -> None:
    source = read_folder_dataset(_folder_dataset(tmp_path, stems=("b", "a", "c")))
    assert [s.stem for s in source.train] == ["a", "b", "c"] and source.val == ()
    assert source.classes == ("background", "cat", "dog")
    assert label_sets(source.train, 3) == [frozenset({0, 2}), frozenset({0, 1}), frozenset({0, 1})]  # a, b, c


def test_folder_splits_are_read_in_order(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path, stems=("a", "b", "c"))
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("c\na\n\n")
    (root / "splits" / "val.txt").write_text("b\n")
    source = read_folder_dataset(root)
    assert [s.stem for s in source.train] == ["c", "a"] and [s.stem for s in source.val] == ["b"]
    (root / "splits" / "val.txt").write_text("b\na\n")
    with pytest.raises(DataError, match="one split only"):
        read_folder_dataset(root)


def _voc_tree(parent: Path) -> Path:
    voc = parent / "VOCdevkit" / "VOC2012"
    for index, stem in enumerate(("2007_a", "2007_b", "2007_c")):
        _save_image(voc / "JPEGImages" / f"{stem}.jpg", seed=index)
        _save_mask(voc / "SegmentationClass" / f"{stem}.png", _labels(inner=15), palette=True)
        _save_mask(voc / "SegmentationClassAug" / f"{stem}.png", _labels(inner=20), palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_b\n2007_a\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_c\n")
    return voc


def test_voc_reader_finds_root_and_reads_palette_indices(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    source = read_voc(tmp_path, aug=False)
    assert source.root == voc and len(source.classes) == 21
    assert source.classes[15] == "person" and source.classes[20] == "tvmonitor"
    assert [s.stem for s in source.train] == ["2007_b", "2007_a"] and [s.stem for s in source.val] == [
        "2007_c"
    ]
    mask = load_mask(source.train[0], 21, source.label_map)
    assert set(np.unique(mask).tolist()) == {0, 15, 255}
    assert label_sets(source.val, 21) == [frozenset({0, 15})]


def test_voc_aug_is_picked_and_its_list_drops_val_stems(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    (voc / "ImageSets" / "SegmentationAug").mkdir()
    lines = [f"/JPEGImages/{s}.jpg /SegmentationClassAug/{s}.png" for s in ("2007_a", "2007_c", "2007_b")]
    (voc / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    source = read_source(voc)
    assert [s.stem for s in source.train] == ["2007_a", "2007_b"]
    assert source.train[0].mask_path == voc / "SegmentationClassAug" / "2007_a.png"
    assert set(np.unique(load_mask(source.train[0], 21)).tolist()) == {0, 20, 255}


def test_voc_list_naming_a_missing_image_fails(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_c\n2007_zz\n")
    with pytest.raises(DataError, match=r"2007_zz\.jpg: missing \(listed in .*val\.txt\)"):
        read_voc(voc, aug=False)


def test_ade_reader_maps_other_to_ignore(tmp_path: Path) -> None:
    ade = tmp_path / "ADEChallengeData2016"
    raw = np.zeros((16, 20), dtype=np.uint8)
    raw[:, 5:10], raw[:, 10:] = 1, 150
    for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        _save_image(ade / "images" / split / f"{stem}.jpg")
        _save_mask(ade / "annotations" / split / f"{stem}.png", raw)
    source = read_source(tmp_path)
    assert isinstance(source.label_map, tuple) and len(source.label_map) == 256
    assert read_ade20k(ade).train == source.train
    assert len(source.classes) == 151 and source.classes[1] == "wall" and source.classes[150] == "flag"
    assert source.classes[45] == "chest of drawers"
    mask = load_mask(source.val[0], 151, source.label_map)
    assert (mask[:, :5] == 255).all() and (mask[:, 5:10] == 1).all() and (mask[:, 10:] == 150).all()
    assert label_sets(source.train, 151, source.label_map) == [frozenset({1, 150})]


def test_unknown_layout_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="unknown dataset layout"):
        read_source(tmp_path)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("background\ncat\n\ndog\n", "line 3 is blank"),
        ("background\ncat\ncat\n", "line 3 repeats class 'cat' of line 2"),
        ("background\n", "need background plus"),
    ],
)
def test_bad_classes_txt(tmp_path: Path, classes: str, message: str) -> None:
    root = _folder_dataset(tmp_path, classes=classes)
    with pytest.raises(DataError, match=message) as error:
        read_folder_dataset(root)
    assert str(root / "classes.txt") in str(error.value)


def test_missing_classes_txt_mask_or_image(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path)
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png: the mask .*b\.png is missing"):
        read_folder_dataset(root)
    (root / "images" / "b.png").unlink()
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"train\.txt: stem 'b' has no image"):
        read_folder_dataset(root)
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes\.txt: missing"):
        read_folder_dataset(root)


def test_corrupt_and_truncated_images_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match="garbage.jpg: cannot read image"):
        load_image(garbage)
    full = _save_image(tmp_path / "full.png", 200, 200)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.png: corrupt or truncated"):
        load_image(truncated)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12, 40])  # above the limit (PIL warns), far above it (PIL raises)
def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    path = _save_image(tmp_path / "big.png", side, side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="big.png: image"):
        load_image(path)


def test_mask_errors_name_the_file(tmp_path: Path) -> None:
    bad_label = _labels()
    bad_label[0, 0] = 37
    sample = Sample("x", tmp_path / "x.png", _save_mask(tmp_path / "x_mask.png", bad_label))
    with pytest.raises(
        DataError, match=r"x_mask\.png: label 37 is not a class index \(0\.\.20\) nor 255 \(ignore\)"
    ):
        load_mask(sample, 21)
    assert load_mask(sample, 38)[0, 0] == 37
    rgb_path = tmp_path / "rgb_mask.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(rgb_path)
    with pytest.raises(DataError, match=r"rgb_mask\.png: mask has mode RGB; masks must be single channel"):
        load_mask(Sample("y", tmp_path / "y.png", rgb_path), 21)


def test_dataset_rejects_mask_of_another_size(tmp_path: Path) -> None:
    sample = Sample(
        "x", _save_image(tmp_path / "x.png", 20, 16), _save_mask(tmp_path / "x_mask.png", _labels(10, 20))
    )
    dataset = SegmentationDataset([sample], 3, None, eval_transform(8))
    with pytest.raises(DataError, match=r"x_mask\.png: mask is 20x10 but image .*x\.png is 20x16"):
        dataset[0]


def test_dataset_applies_label_lut_and_transform(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path)
    source = read_folder_dataset(root)
    lut = np.zeros(256, dtype=np.uint8)
    lut[2], lut[255] = 1, 255  # class "dog" -> 1, "cat" -> background
    dataset = SegmentationDataset(source.train, len(source.classes), lut, eval_transform(16))
    assert len(dataset) == 2
    cat_image, cat_mask = dataset[0]
    _, dog_mask = dataset[1]
    assert (
        cat_image.shape == (3, 16, 16)
        and cat_mask.shape == (16, 16)
        and cat_mask.dtype.is_floating_point is False
    )
    assert set(cat_mask.unique().tolist()) == {0, 255} and set(dog_mask.unique().tolist()) == {0, 1, 255}
    with pytest.raises(ValueError, match="label_lut"):
        SegmentationDataset(source.train, 3, np.zeros(256, dtype=np.uint8), eval_transform(16))
