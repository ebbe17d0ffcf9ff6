"""Dataset readers: the project folder format, Pascal VOC 2012 and ADE20K (``ADEChallengeData2016``).

Every reader returns a :class:`SegmentationSource`: the class names (index 0 = background), the train
and val samples, and an optional lookup table from raw mask values to class indices. Files are only
listed here; :func:`load_image` and :func:`load_mask` read and validate them, raising :class:`DataError`
with the offending file and what to fix.

A project-format folder may give image-level labels instead of masks (weak supervision): a
``labels.csv`` with the header ``image,labels``, one row per image stem, its classes (names from
``classes.txt``) separated by ``;``, an empty field meaning none of them. Such images become weak samples
(``mask_path`` None, ``image_labels`` set); an image with a mask uses the mask whatever its row says.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABELS_FILE = "labels.csv"
LABELS_HEADER = ("image", "labels")
LABEL_SEPARATOR = ";"

VOC_CLASSES = tuple(
    """
background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike
person pottedplant sheep sofa train tvmonitor
""".split()
)

# objectInfo150 order; annotation value k (1..150) is class k, 0 ("other") is ignored.
_ADE_NAMES = """
wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk, person,
earth, door, table, mountain, plant, curtain, chair, car, water, painting, sofa, shelf, house, sea,
mirror, rug, field, armchair, seat, fence, desk, rock, wardrobe, lamp, bathtub, railing, cushion, base,
box, column, signboard, chest of drawers, counter, sand, sink, skyscraper, fireplace, refrigerator,
grandstand, path, stairs, runway, case, pool table, pillow, screen door, stairway, river, bridge,
bookcase, blind, coffee table, toilet, flower, book, hill, bench, countertop, stove, palm,
kitchen island, computer, swivel chair, boat, bar, arcade machine, hovel, bus, towel, light, truck, tower,
chandelier, awning, streetlight, booth, television receiver, airplane, dirt track, apparel, pole, land,
bannister, escalator, ottoman, bottle, buffet, poster, stage, van, ship, fountain, conveyer belt,
canopy, washer, plaything, swimming pool, stool, barrel, basket, waterfall, tent, bag, minibike, cradle,
oven, ball, food, step, tank, trade name, microwave, pot, animal, bicycle, lake, dishwasher, screen,
blanket, sculpture, hood, sconce, vase, traffic light, tray, ashcan, fan, pier, crt screen, plate,
monitor, bulletin board, shower, radiator, glass, clock, flag
"""
ADE_CLASSES = ("background", *(" ".join(name.split()) for name in _ADE_NAMES.split(",")))
ADE_LABEL_MAP = (IGNORE,) + tuple(range(1, 256))


class DataError(ValueError):
    """Bad dataset content; the message names the offending file and says what to fix.

    Args:
        path: The file or folder concerned.
        problem: What is wrong and how to fix it; ``str(error)`` is ``"<path>: <problem>"``.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem

    def __reduce__(self) -> tuple[type[DataError], tuple[Path, str]]:
        return type(self), (self.path, self.problem)  # picklable across DataLoader workers


@dataclass(frozen=True)
class Sample:
    """One image and its label: a mask, or (weak) the set of classes it shows.

    Attributes:
        stem: The image's name without suffix.
        image_path: The image file.
        mask_path: Its mask; None when the image has image-level labels only.
        image_labels: Source class indices the image shows (background excluded); set iff ``mask_path``
            is None.

    Raises:
        ValueError: When both or neither of ``mask_path`` and ``image_labels`` are given.
    """

    stem: str
    image_path: Path
    mask_path: Path | None
    image_labels: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if (self.mask_path is None) == (self.image_labels is None):
            raise ValueError(f"sample {self.stem!r}: give exactly one of mask_path and image_labels")

    @property
    def is_weak(self) -> bool:
        """True when the image has image-level labels only (no mask)."""
        return self.mask_path is None


@dataclass(frozen=True)
class SegmentationSource:
    """A dataset as listed on disk.

    Attributes:
        root: The dataset folder that was read.
        classes: Class names; index 0 is background.
        train: Training samples, in the order of the dataset's list files (or sorted by stem).
        val: Validation samples.
        label_map: 256-entry lookup table from raw mask value to class index (255 = ignore);
            None when the raw values already are class indices.
        class_file: The file the class names were read from (``classes.txt``); None when the layout
            fixes them (VOC, ADE20K).
    """

    root: Path
    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    label_map: tuple[int, ...] | None = None
    class_file: Path | None = None


def read_folder_dataset(root: Path) -> SegmentationSource:
    """Reads the project folder format.

    Layout: ``classes.txt`` (line i = name of mask value i, line 0 background),
    ``images/<stem>.(jpg|jpeg|png)``, ``masks/<stem>.png`` and/or ``labels.csv`` (image-level labels,
    see the module docstring), and optionally ``splits/train.txt`` and ``splits/val.txt`` (one stem a
    line). Without ``splits/train.txt`` every stem not listed in ``splits/val.txt`` is a training stem.
    An image with a mask is a fully labelled sample; one without a mask but with a ``labels.csv`` row is
    a weak sample.

    Args:
        root: The dataset folder.

    Returns:
        The listed dataset.

    Raises:
        DataError: On a bad ``classes.txt`` or ``labels.csv`` (bad header, unknown class, duplicate row,
            row without an image: the message names the line), a missing image, an image with neither a
            mask nor a row, or overlapping splits.
    """
    root = Path(root)
    classes = _read_classes(root / "classes.txt")
    images = _index_images(root / "images")
    labels_file = root / LABELS_FILE
    image_labels = _read_labels_file(labels_file, classes, images) if labels_file.is_file() else None
    train_file, val_file = root / "splits" / "train.txt", root / "splits" / "val.txt"
    val_stems = _read_stem_list(val_file) if val_file.is_file() else []
    if train_file.is_file():
        train_stems = _read_stem_list(train_file)
        overlap = sorted(set(train_stems) & set(val_stems))
        if overlap:
            raise DataError(
                val_file,
                f"{len(overlap)} stem(s) are also in {train_file} (first: {overlap[0]!r}); "
                "a stem may be in one split only",
            )
    else:
        train_stems = sorted(set(images) - set(val_stems))

    def samples(stems: list[str], listed_in: Path) -> tuple[Sample, ...]:
        found = []
        for stem in stems:
            if stem not in images:
                raise DataError(listed_in, f"stem {stem!r} has no image {root / 'images' / stem}.(jpg|png)")
            mask_path = root / "masks" / f"{stem}.png"
            if mask_path.is_file():
                found.append(Sample(stem, images[stem], mask_path))
            elif image_labels is None:
                raise DataError(images[stem], f"the mask {mask_path} is missing; add it or remove the image")
            elif stem in image_labels:
                found.append(Sample(stem, images[stem], None, image_labels[stem]))
            else:
                raise DataError(
                    labels_file,
                    f"image {stem!r} ({images[stem]}) has no row here and no mask {mask_path}; add a row "
                    f"'{stem},<class>;<class>' (an empty field: none of the classes), add the mask, or "
                    "remove the image",
                )
        return tuple(found)

    return SegmentationSource(
        root=root,
        classes=classes,
        train=samples(train_stems, train_file if train_file.is_file() else root / "images"),
        val=samples(val_stems, val_file),
        class_file=root / "classes.txt",
    )


def read_voc(root: Path, aug: bool | None = None) -> SegmentationSource:
    """Reads Pascal VOC 2012 (optionally with the SBD ``SegmentationClassAug`` masks).

    Args:
        root: The ``VOC2012`` folder, or a parent holding ``VOC2012`` or ``VOCdevkit/VOC2012``.
        aug: Use ``SegmentationClassAug`` and ``ImageSets/SegmentationAug/train_aug.txt`` (when present,
            else ``ImageSets/Segmentation/train.txt``); None picks the augmented masks when they exist.

    Returns:
        The listed dataset, train and val in list-file order. Train stems also in the val list are
        dropped (some ``train_aug`` lists contain val images).

    Raises:
        DataError: When the layout is not VOC or a listed file is missing.
    """
    voc = _find_voc_root(Path(root))
    if voc is None:
        raise DataError(root, "no VOC2012 layout found (JPEGImages/ + SegmentationClass[Aug]/ + ImageSets/)")
    if aug is None:
        aug = (voc / "SegmentationClassAug").is_dir()
    mask_dir = voc / ("SegmentationClassAug" if aug else "SegmentationClass")
    if not mask_dir.is_dir():
        raise DataError(mask_dir, f"folder missing; add the masks or choose aug={not aug}")
    train_list = voc / "ImageSets" / "SegmentationAug" / "train_aug.txt"
    if not (aug and train_list.is_file()):
        train_list = voc / "ImageSets" / "Segmentation" / "train.txt"
    val_list = voc / "ImageSets" / "Segmentation" / "val.txt"
    val_stems = _read_stem_list(val_list)
    val_set = set(val_stems)
    train_stems = [stem for stem in _read_stem_list(train_list) if stem not in val_set]

    def samples(stems: list[str], listed_in: Path) -> tuple[Sample, ...]:
        return tuple(
            _existing_sample(stem, voc / "JPEGImages" / f"{stem}.jpg", mask_dir / f"{stem}.png", listed_in)
            for stem in stems
        )

    return SegmentationSource(
        root=voc,
        classes=VOC_CLASSES,
        train=samples(train_stems, train_list),
        val=samples(val_stems, val_list),
    )


def read_ade20k(root: Path) -> SegmentationSource:
    """Reads ADE20K as distributed for the scene parsing challenge (``ADEChallengeData2016``).

    Annotation 0 ("other") becomes 255 (ignore) through ``label_map``; 1..150 are the classes; class 0
    ("background") has no pixels.

    Args:
        root: The ``ADEChallengeData2016`` folder or its parent.

    Returns:
        The listed dataset, samples sorted by file name (the order MiB's index files refer to).

    Raises:
        DataError: When the layout is not ADE20K or an image has no annotation.
    """
    ade = _find_ade_root(Path(root))
    if ade is None:
        raise DataError(
            root, "no ADEChallengeData2016 layout found (images/training/, annotations/training/)"
        )

    def samples(split: str) -> tuple[Sample, ...]:
        image_dir = ade / "images" / split
        return tuple(
            _existing_sample(path.stem, path, ade / "annotations" / split / f"{path.stem}.png", image_dir)
            for path in sorted(image_dir.glob("*.jpg"))
        )

    return SegmentationSource(
        root=ade,
        classes=ADE_CLASSES,
        train=samples("training"),
        val=samples("validation"),
        label_map=ADE_LABEL_MAP,
    )


def read_source(root: Path) -> SegmentationSource:
    """Reads a dataset in whichever supported layout ``root`` has.

    Args:
        root: A project-format folder (has ``classes.txt``), a VOC2012 or an ADE20K folder.

    Returns:
        The listed dataset.

    Raises:
        DataError: When no supported layout matches.
    """
    root = Path(root)
    if (root / "classes.txt").is_file():
        return read_folder_dataset(root)
    if _find_voc_root(root) is not None:
        return read_voc(root)
    if _find_ade_root(root) is not None:
        return read_ade20k(root)
    raise DataError(
        root,
        "unknown dataset layout; expected classes.txt + images/ + masks/ (project format), "
        "a Pascal VOC 2012 folder (JPEGImages/, SegmentationClass/) "
        "or ADEChallengeData2016 (images/, annotations/)",
    )


def load_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Loads an image as RGB.

    Args:
        path: Image file.
        max_pixels: Largest width x height accepted, checked from the header before decoding
            (decompression bomb guard); None uses ``PIL.Image.MAX_IMAGE_PIXELS``.

    Returns:
        The decoded RGB image.

    Raises:
        DataError: When the file is unreadable, corrupt, truncated or larger than ``max_pixels``.
    """
    with _open(path, max_pixels) as image:
        return image.convert("RGB")


def image_size(path: Path, max_pixels: int | None = None) -> tuple[int, int]:
    """Decodes an image completely (so truncation shows) and returns its size, without keeping the pixels.

    Args:
        path: Image file.
        max_pixels: As for :func:`load_image`.

    Returns:
        (width, height).

    Raises:
        DataError: As for :func:`load_image`.
    """
    with _open(path, max_pixels) as image:
        return image.size


def load_mask(
    sample: Sample,
    num_classes: int,
    label_map: Sequence[int] | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Loads a mask as class indices.

    Args:
        sample: The sample whose ``mask_path`` is read.
        num_classes: Number of classes including background; valid labels are 0..num_classes-1 and 255.
        label_map: Optional 256-entry lookup table raw value -> class index (255 = ignore).
        max_pixels: As for :func:`load_image`.

    Returns:
        uint8 array (H, W) of class indices and 255.

    Raises:
        DataError: When the sample is weak (it has no mask: callers branch on ``sample.is_weak``), when
            the mask is not single channel or palette, unreadable, larger than ``max_pixels``, or holds a
            label that is neither a class index nor 255.
    """
    mask_path = sample.mask_path
    if mask_path is None:
        raise DataError(
            sample.image_path, "has image-level labels only (labels.csv), no mask to load; add its mask"
        )
    with _open(mask_path, max_pixels) as mask_image:
        if mask_image.mode not in ("L", "P"):
            raise DataError(
                mask_path,
                f"mask has mode {mask_image.mode}; masks must be single channel (L) or "
                "palette (P) PNGs whose values are class indices (255 = ignore), not colour images",
            )
        mask = np.array(mask_image, dtype=np.uint8)  # (H, W) raw values; palette images give palette indices
    if label_map is not None:
        mask = np.asarray(label_map, dtype=np.uint8)[mask]
    invalid = (mask >= num_classes) & (mask != IGNORE)
    if invalid.any():
        raise DataError(
            mask_path,
            f"label {int(mask[invalid][0])} is not a class index (0..{num_classes - 1}) nor {IGNORE} "
            "(ignore); every mask value must be a line number of the class list (0 = first line) or 255",
        )
    return mask


def check_mask_size(sample: Sample, image_size: tuple[int, int], mask: np.ndarray) -> None:
    """Checks that a mask (H, W) has the size of its image.

    Args:
        sample: The sample (for the message).
        image_size: The image's (width, height).
        mask: The loaded mask (H, W).

    Raises:
        DataError: Naming the mask when the sizes differ.
    """
    if image_size != (mask.shape[1], mask.shape[0]):
        raise DataError(
            sample.mask_path or sample.image_path,
            f"mask is {mask.shape[1]}x{mask.shape[0]} but image {sample.image_path} is "
            f"{image_size[0]}x{image_size[1]}; they must have the same size",
        )


def present_labels(mask: np.ndarray) -> frozenset[int]:
    """The labels present in a mask (H, W) of class indices, 255 excluded."""
    counts = np.bincount(mask.ravel(), minlength=256)  # (256,)
    counts[IGNORE] = 0
    return frozenset(np.flatnonzero(counts).tolist())


def label_sets(
    source_samples: Sequence[Sample], num_classes: int, label_map: Sequence[int] | None = None
) -> list[frozenset[int]]:
    """Lists the labels present in each mask (255 excluded), reading every mask once.

    Args:
        source_samples: Samples whose masks are read.
        num_classes: Number of classes including background.
        label_map: Optional raw value -> class index lookup table.

    Returns:
        One set of class indices per sample, in order.
    """
    return [present_labels(load_mask(sample, num_classes, label_map)) for sample in source_samples]


def _open(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Opens and decodes an image file, turning every failure into a DataError naming it.

    The pixel count is checked from the header, before the pixels are decoded.
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DataError(path, f"image too large ({error}); downscale it") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(
            path, f"cannot read image ({error}); replace the file with a valid JPEG or PNG"
        ) from error
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise DataError(
            path,
            f"image has {image.width}x{image.height} pixels, more than the {limit} allowed; downscale it",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        image.close()
        raise DataError(path, f"corrupt or truncated image ({error}); replace the file") from error
    return image


def _read_labels_file(
    path: Path, classes: tuple[str, ...], images: dict[str, Path]
) -> dict[str, frozenset[int]]:
    """Reads ``labels.csv``: each image stem's set of class indices (background excluded).

    Args:
        path: The ``labels.csv`` file.
        classes: The class names of ``classes.txt`` (index 0 background).
        images: Image stem -> file, as found in ``images/``.

    Returns:
        Stem -> class indices, for every row.

    Raises:
        DataError: Naming the line: a header other than ``image,labels``, a row without two fields, a row
            for a stem with no image, a second row for a stem, an unknown class name.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:  # -sig: spreadsheets write a BOM
            rows = csv.reader(file)  # streamed: one row in memory (a field is at most csv.field_size_limit())
            try:
                return _parse_label_rows(rows, path, classes, images)
            except csv.Error as error:
                raise DataError(path, f"line {rows.line_num}: {error}; write plain CSV rows") from error
    except UnicodeDecodeError as error:
        raise DataError(path, f"not UTF-8 text ({error}); save it as UTF-8") from error


def _parse_label_rows(
    rows: Iterator[list[str]], path: Path, classes: tuple[str, ...], images: dict[str, Path]
) -> dict[str, frozenset[int]]:
    """The rows of :func:`_read_labels_file` (``rows.line_num`` names the line in its errors)."""
    index_of = {name: index for index, name in enumerate(classes)}
    header = [field.strip().lower() for field in next(rows, [])]
    if tuple(header) != LABELS_HEADER:
        raise DataError(
            path,
            f"line 1: header is {','.join(header)!r}; the first line must be '{','.join(LABELS_HEADER)}'",
        )
    found: dict[str, frozenset[int]] = {}
    first_line: dict[str, int] = {}
    for row in rows:
        line = rows.line_num  # type: ignore[attr-defined]
        if not any(field.strip() for field in row):
            continue
        if len(row) != 2:
            hint = f"; separate the classes with {LABEL_SEPARATOR!r}, not ','" if len(row) > 2 else ""
            raise DataError(path, f"line {line}: {len(row)} fields; a row is '<image stem>,<labels>'{hint}")
        stem, names = row[0].strip(), row[1]
        if stem not in images:
            suffix_hint = (
                f"; write the stem {Path(stem).stem!r} without the suffix"
                if Path(stem).stem in images and Path(stem).suffix
                else ""
            )
            raise DataError(
                path,
                f"line {line}: no image {stem!r} in {path.parent / 'images'} (.jpg, .jpeg or .png); "
                f"remove the row or add the image{suffix_hint}",
            )
        if stem in found:
            raise DataError(
                path, f"line {line}: image {stem!r} already has a row (line {first_line[stem]}); keep one row"
            )
        labels = set()
        for name in (part.strip() for part in names.split(LABEL_SEPARATOR)):
            if not name:
                continue
            if name not in index_of:
                close = difflib.get_close_matches(name, classes, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataError(
                    path,
                    f"line {line}: unknown class {name!r}{hint}; use names of {path.parent / 'classes.txt'}, "
                    f"separated by {LABEL_SEPARATOR!r}",
                )
            labels.add(index_of[name])
        found[stem] = frozenset(labels - {0})  # background is in every image; naming it adds nothing
        first_line[stem] = line
    return found


def _read_classes(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise DataError(path, "missing; write one class name a line, line 0 = background")
    lines = [line.strip() for line in _read_text(path).rstrip().splitlines()]
    seen: dict[str, int] = {}
    for number, name in enumerate(lines, start=1):
        if not name:
            raise DataError(path, f"line {number} is blank; line i must name the class of mask value i")
        if name in seen:
            raise DataError(
                path, f"line {number} repeats class {name!r} of line {seen[name]}; names must be unique"
            )
        seen[name] = number
    if not 2 <= len(lines) <= IGNORE:
        raise DataError(path, f"{len(lines)} classes; need background plus 1..{IGNORE - 1} classes")
    return tuple(lines)


def _index_images(image_dir: Path) -> dict[str, Path]:
    if not image_dir.is_dir():
        raise DataError(image_dir, "folder missing; put the images there as <stem>.jpg or <stem>.png")
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            raise DataError(
                path, f"stem {path.stem!r} also used by {images[path.stem]}; stems must be unique"
            )
        images[path.stem] = path
    if not images:
        raise DataError(image_dir, "no .jpg/.jpeg/.png images")
    return images


def _read_stem_list(path: Path) -> list[str]:
    """Reads a list file: one stem a line, or a path whose stem is taken (``/JPEGImages/x.jpg ...``)."""
    if not path.is_file():
        raise DataError(path, "split list missing")
    return [Path(line.split()[0]).stem for line in _read_text(path).splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(path, f"not UTF-8 text ({error}); save it as UTF-8") from error


def _existing_sample(stem: str, image_path: Path, mask_path: Path, listed_in: Path) -> Sample:
    for path in (image_path, mask_path):
        if not path.is_file():
            raise DataError(
                path, f"missing (listed in {listed_in}); restore it or remove {stem!r} from the list"
            )
    return Sample(stem, image_path, mask_path)


def _find_voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets").is_dir():
            return candidate
    return None


def _find_ade_root(root: Path) -> Path | None:
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images" / "training").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    return None
