"""A synthetic segmentation dataset in the project folder format, learnable by a small CNN in minutes.

Each class is a unique (shape, colour, texture) combination: shape ``i % 8``, texture ``(i + i // 8) % 4``
(unique for the first 32 classes) and a golden-ratio hue per class (classes 32 apart, which share shape
and texture, differ by about 80 degrees of hue). Objects are saturated; the background is desaturated,
blotchy, noisy clutter that belongs to no class. Like Pascal VOC, every object border carries an ignore
band (255) about 2 px wide at 128 px.

With ``weak_train`` the training split is written as for weak supervision: a ``labels.csv`` naming the
classes each training image shows (derived from its mask) and no training masks; validation keeps its masks.
:func:`masks_to_image_labels` does the same to any project-format folder.

Two scene styles (``SCENES``): ``shapes``, the tables' data, and ``clutter``, other shapes and textures,
more and smaller objects, paler colours and denser clutter with filled grey shapes, kept for checking a
method on data it was not tuned on.
"""

from __future__ import annotations

import colorsys
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.data.sources import IGNORE, LABEL_SEPARATOR, LABELS_FILE, LABELS_HEADER, present_labels

SHAPES = ("circle", "square", "triangle", "ellipse", "cross", "ring", "diamond", "star")
TEXTURES = ("plain", "striped", "dotted", "checkered")
HUE_NAMES = tuple("red orange yellow lime green teal cyan azure blue violet magenta pink".split())
MAX_CLASSES = 64
MIN_SIZE, MAX_SIZE = 32, 1024
OBJECT_SIDE = (0.15, 0.45)  # object diameter as a fraction of the image side
GOLDEN = (5**0.5 - 1) / 2


@dataclass(frozen=True)
class Scene:
    """How the images of a dataset are composed.

    Attributes:
        shapes: 8 shape names of ``_unit_polygons``, class ``i`` has ``shapes[i % 8]``.
        textures: 4 texture names of ``_Renderer._texture``.
        objects: Objects per image, inclusive range.
        object_side: Object diameter as a fraction of the image side.
        saturation: Of the class colours (the background is grey).
        clutter: Background lines, outlines and filled grey shapes per image, inclusive range.
        filled_clutter: Share of the clutter drawn as filled grey class-like shapes.
    """

    shapes: tuple[str, ...]
    textures: tuple[str, ...]
    objects: tuple[int, int]
    object_side: tuple[float, float]
    saturation: float
    clutter: tuple[int, int]
    filled_clutter: float


SCENES = {
    "shapes": Scene(SHAPES, TEXTURES, (2, 4), OBJECT_SIDE, 0.85, (3, 7), 0.0),
    "clutter": Scene(
        ("pentagon", "hexagon", "chevron", "rectangle", "trapezoid", "half_disc", "hourglass", "plus"),
        ("plain", "grid", "waves", "speckled"),
        (3, 6),
        (0.12, 0.35),
        0.6,
        (8, 16),
        0.5,
    ),
}


@dataclass(frozen=True)
class ClassStyle:
    """How one synthetic class looks.

    Attributes:
        name: ``<hue>_<shape>_<texture>``, e.g. ``red_circle_plain``.
        shape: One of :data:`SHAPES`.
        texture: One of :data:`TEXTURES`.
        rgb: Fill colour, 0..255 per channel; textures use a darker shade of it.
    """

    name: str
    shape: str
    texture: str
    rgb: tuple[float, float, float]


def class_styles(num_classes: int, scene: Scene = SCENES["shapes"]) -> tuple[ClassStyle, ...]:
    """Returns the appearance of classes 1..num_classes (in that order)."""
    styles = []
    shapes, textures = scene.shapes, scene.textures
    for i in range(num_classes):
        hue = (i * GOLDEN) % 1.0
        shape, texture = shapes[i % len(shapes)], textures[(i + i // len(shapes)) % len(textures)]
        hue_name = HUE_NAMES[round(hue * len(HUE_NAMES)) % len(HUE_NAMES)]
        red, green, blue = (255.0 * channel for channel in colorsys.hsv_to_rgb(hue, scene.saturation, 0.95))
        styles.append(ClassStyle(f"{hue_name}_{shape}_{texture}", shape, texture, (red, green, blue)))
    return tuple(styles)


def write_synthetic_dataset(
    out: Path,
    num_classes: int,
    num_train: int,
    num_val: int,
    size: int,
    seed: int,
    scene: str = "shapes",
    weak_train: bool = False,
) -> Path:
    """Writes a synthetic dataset in the project folder format.

    Images hold 2-4 objects of random classes (later ones may occlude earlier ones); the topmost object of
    image k has class ``k % num_classes + 1``, so every class appears in a split of at least
    ``num_classes`` images. Object diameters are 15-45 % of the side, but at least 8 band widths + 8 px so
    thin parts (ring, star) keep labelled pixels inside the ignore band. The output is byte-identical for
    the same arguments (and numpy / Pillow versions).

    Args:
        out: Output folder; must not exist or be empty.
        num_classes: Foreground classes, 1..64 (background is added as class 0).
        num_train: Training images (>= 1).
        num_val: Validation images (>= 0).
        size: Image side in pixels, 32..1024.
        seed: Random seed.
        scene: A key of ``SCENES``.
        weak_train: Write the training split's labels as ``labels.csv`` (image-level labels derived from
            the masks) instead of masks; the images are the same as without it.

    Returns:
        ``out``.

    Raises:
        ValueError: On arguments out of range or an unknown scene.
        FileExistsError: When ``out`` is a non-empty folder.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train} and {num_val}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in {MIN_SIZE}..{MAX_SIZE} px, got {size}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {sorted(SCENES)}, got {scene!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: folder is not empty; choose a new output folder")
    for folder in ("images", "masks", "splits"):
        (out / folder).mkdir(parents=True, exist_ok=True)

    styles = class_styles(num_classes, SCENES[scene])
    (out / "classes.txt").write_text("\n".join(["background", *(style.name for style in styles)]) + "\n")
    renderer = _Renderer(size, styles, SCENES[scene], np.random.default_rng(seed))
    for split, count in (("train", num_train), ("val", num_val)):
        stems = [f"{split}_{index:05d}" for index in range(count)]
        for index, stem in enumerate(stems):
            image, labels = renderer.render(top_class=index % num_classes)
            Image.fromarray(image).save(out / "images" / f"{stem}.png")
            Image.fromarray(labels).save(out / "masks" / f"{stem}.png")
        (out / "splits" / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in stems))
    if weak_train:
        masks_to_image_labels(out, [f"train_{index:05d}" for index in range(num_train)])
    return out


def masks_to_image_labels(dataset: Path, stems: list[str]) -> Path:
    """Replaces the masks of ``stems`` in a project-format folder by ``labels.csv`` rows (weak labels).

    Each row names the classes with pixels in the stem's mask (background and ignore left out); the masks
    are deleted. Rows already in ``labels.csv`` are kept.

    Args:
        dataset: A project-format dataset folder (``classes.txt``, ``masks/``).
        stems: Stems whose masks become rows; each must have a mask and no row yet.

    Returns:
        The ``labels.csv`` path.

    Raises:
        FileNotFoundError: When a stem has no mask.
        ValueError: When a stem already has a row.
    """
    names = (dataset / "classes.txt").read_text(encoding="utf-8").splitlines()
    labels_file = dataset / LABELS_FILE
    rows = (
        list(csv.reader(labels_file.read_text(encoding="utf-8-sig").splitlines()))
        if labels_file.is_file()
        else [list(LABELS_HEADER)]
    )
    has_row = {row[0] for row in rows[1:] if row}
    for stem in stems:
        if stem in has_row:
            raise ValueError(f"{labels_file}: {stem!r} already has a row")
        mask_path = dataset / "masks" / f"{stem}.png"
        with Image.open(mask_path) as mask_image:
            shown = sorted(present_labels(np.asarray(mask_image)) - {0})  # mask (H, W) class indices
        rows.append([stem, LABEL_SEPARATOR.join(names[index].strip() for index in shown)])
        mask_path.unlink()
    with labels_file.open("w", encoding="utf-8", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows(rows)
    return labels_file


def _unit_polygons(shape: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns the outline (N, 2) of ``shape`` within the unit circle and an optional hole outline."""
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (48, 2)

    def regular(count: int, start: float) -> np.ndarray:
        corners = start + 2 * np.pi * np.arange(count) / count
        return np.stack([np.cos(corners), np.sin(corners)], axis=1)  # (count, 2)

    arm = 0.35
    polygons = {
        "circle": circle,
        "square": regular(4, np.pi / 4),
        "triangle": regular(3, np.pi / 2),
        "ellipse": circle * (1.0, 0.55),
        "cross": np.array(
            [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1)]
            + [(-arm, -1), (-arm, -arm), (-1, -arm), (-1, arm), (-arm, arm), (-arm, 1)],
            dtype=float,
        ),
        "ring": circle,
        "diamond": regular(4, 0.0) * (0.6, 1.0),
        "star": regular(10, np.pi / 2) * np.where(np.arange(10) % 2 == 0, 1.0, 0.42)[:, None],
        "pentagon": regular(5, np.pi / 2),
        "hexagon": regular(6, 0.0),
        "chevron": np.array([(-1, 0.6), (0, -0.2), (1, 0.6), (1, 0.0), (0, -0.8), (-1, 0.0)], dtype=float),
        "rectangle": np.array([(-1, -0.4), (1, -0.4), (1, 0.4), (-1, 0.4)], dtype=float),
        "trapezoid": np.array([(-1, 0.6), (1, 0.6), (0.45, -0.6), (-0.45, -0.6)], dtype=float),
        "half_disc": circle[: len(circle) // 2 + 1] * (1.0, 1.0) - (0, 0.3),
        "hourglass": np.array(
            [(-0.8, -1), (0.8, -1), (0.15, 0), (0.8, 1), (-0.8, 1), (-0.15, 0)], dtype=float
        ),
        "plus": np.array(
            [(0.2, 1), (0.2, 0.2), (1, 0.2), (1, -0.2), (0.2, -0.2), (0.2, -1)]
            + [(-0.2, -1), (-0.2, -0.2), (-1, -0.2), (-1, 0.2), (-0.2, 0.2), (-0.2, 1)],
            dtype=float,
        ),
    }
    return polygons[shape], circle * 0.5 if shape == "ring" else None


class _Renderer:
    """Draws images and label maps of one size; holds the random stream so output is reproducible."""

    def __init__(
        self, size: int, styles: tuple[ClassStyle, ...], scene: Scene, rng: np.random.Generator
    ) -> None:
        self.size = size
        self.styles = styles
        self.scene = scene
        self.rng = rng
        self.polygons = {shape: _unit_polygons(shape) for shape in scene.shapes}
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (S, S) each
        self.period = max(4, size // 12)  # texture period in px
        band = max(1, round(size / 64))
        self.band_out, self.band_in = band // 2, band - band // 2
        self.min_radius = 4.0 * band + 4  # thin parts (ring, star) keep labelled pixels inside the band

    def render(self, top_class: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns an RGB image uint8 (S, S, 3) and its labels uint8 (S, S) with 255 object borders."""
        image = self._background()  # (S, S, 3) float32
        labels = np.zeros((self.size, self.size), dtype=np.uint8)
        low, high = self.scene.objects
        classes = self.rng.integers(len(self.styles), size=int(self.rng.integers(low, high + 1)))
        classes[-1] = top_class
        for class_index in classes:
            style = self.styles[class_index]
            region = self._shape_region(style.shape)  # (S, S) bool
            bright = np.array(style.rgb, dtype=np.float32) * self.rng.uniform(0.85, 1.1)
            dark = bright * 0.45
            image[region] = np.where(self._texture(style.texture)[region][:, None], dark, bright)
            labels[region] = class_index + 1
        border = np.zeros_like(labels, dtype=bool)
        for label in np.unique(labels[labels > 0]):
            region = labels == label
            border |= _dilate(region, self.band_out) & ~_erode(region, self.band_in)
        labels[border] = IGNORE
        image += self.rng.normal(0.0, 6.0, image.shape).astype(np.float32)
        return np.clip(image, 0, 255).round().astype(np.uint8), labels

    def _background(self) -> np.ndarray:
        """Desaturated blotches, lines and outlines with no class colour or shape fill."""
        cells = max(2, self.size // 16)
        blotches = Image.fromarray((self.rng.random((cells, cells)) * 255).astype(np.uint8))
        smooth = blotches.resize((self.size, self.size), Image.Resampling.BILINEAR)
        luminance = np.asarray(smooth, dtype=np.float32) / 255
        base = self.rng.uniform(70, 180) + self.rng.uniform(-15, 15, 3)  # (3,) grey with a slight tint
        canvas = Image.fromarray(np.clip(base + (luminance[..., None] - 0.5) * 90, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        low, high = self.scene.clutter
        for _ in range(int(self.rng.integers(low, high + 1))):
            grey = int(self.rng.integers(30, 226))
            colour = tuple(int(np.clip(grey + offset, 0, 255)) for offset in self.rng.integers(-12, 13, 3))
            x0, y0, x1, y1 = (int(v) for v in self.rng.integers(0, self.size, 4))
            kind = self.rng.random()  # filled shape, line or outline
            if kind < self.scene.filled_clutter:  # a grey shape of some class's outline
                shape = self.scene.shapes[int(self.rng.integers(len(self.scene.shapes)))]
                radius = self.rng.uniform(*self.scene.object_side) * self.size / 2
                points = self.polygons[shape][0] * radius + (x0, y0)  # (N, 2)
                draw.polygon([tuple(point) for point in points.tolist()], fill=colour)
            elif kind < (1 + self.scene.filled_clutter) / 2:
                draw.line((x0, y0, x1, y1), fill=colour, width=int(self.rng.integers(1, 3)))
            else:
                draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=colour)
        return np.asarray(canvas, dtype=np.float32).copy()

    def _shape_region(self, shape: str) -> np.ndarray:
        """Rasterises ``shape`` at a random size, rotation and position; returns a bool mask (S, S)."""
        radius = max(self.min_radius, self.rng.uniform(*self.scene.object_side) * self.size / 2)
        centre = self.rng.uniform(radius, self.size - radius, 2)  # (2,) x, y
        angle = self.rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        canvas = Image.new("L", (self.size, self.size), 0)
        draw = ImageDraw.Draw(canvas)
        outline, hole = self.polygons[shape]
        for polygon, fill in ((outline, 1), (hole, 0)):
            if polygon is not None:
                points = polygon @ rotation.T * radius + centre  # (N, 2)
                draw.polygon([tuple(point) for point in points.tolist()], fill=fill)
        return np.asarray(canvas, dtype=bool)

    def _texture(self, texture: str) -> np.ndarray:
        """Returns where the dark shade goes, bool (S, S), with a random phase (and angle for stripes)."""
        half = self.period / 2
        x, y = self.xx + self.rng.uniform(0, self.period), self.yy + self.rng.uniform(0, self.period)
        if texture == "striped":
            angle = self.rng.uniform(0, np.pi)
            return (x * np.cos(angle) + y * np.sin(angle)) // half % 2 == 0
        if texture == "dotted":
            return (x % self.period - half) ** 2 + (y % self.period - half) ** 2 <= (0.3 * self.period) ** 2
        if texture == "checkered":
            return (x // half + y // half) % 2 == 0
        if texture == "grid":
            return (x % self.period < 0.25 * self.period) | (y % self.period < 0.25 * self.period)
        if texture == "waves":
            return (
                np.sin(
                    2 * np.pi * (y + 0.25 * self.period * np.sin(2 * np.pi * x / self.period)) / self.period
                )
                > 0
            )
        if texture == "speckled":
            return self.rng.random((self.size, self.size)) < 0.3
        return np.zeros((self.size, self.size), dtype=bool)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a bool (H, W) mask by a (2r+1)^2 square."""
    for axis in (0, 1):
        source, mask = mask, mask.copy()
        grown, base = np.moveaxis(mask, axis, 0), np.moveaxis(source, axis, 0)  # views along ``axis``
        for shift in range(1, radius + 1):
            grown[shift:] |= base[:-shift]
            grown[:-shift] |= base[shift:]
    return mask


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion of a bool (H, W) mask by a (2r+1)^2 square; the image edge is not a border."""
    return ~_dilate(~mask, radius)
