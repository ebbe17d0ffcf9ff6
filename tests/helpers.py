"""Small builders shared by the tests: a tiny in-memory dataset, tiny options and model directories."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import torch
from torch.utils.data import DataLoader, Dataset

from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig, bias_of
from training.trainer import StepOptions

# min_iterations=0: the tests' incremental steps run their one epoch (tests of the floor set it).
TINY_OPTIONS = StepOptions(
    epochs=1,
    batch_size=2,
    size=32,
    backbone="resnet10",
    context_channels=16,
    embed_channels=16,
    workers=0,
    min_iterations=0,
)


class TinySet(Dataset):
    """32x32 images with 16x16 squares of the given classes on background, top row ignored."""

    def __init__(self, classes: list[int], n: int = 4, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=gen)
        self.masks = torch.zeros(n, 32, 32, dtype=torch.long)
        for i in range(n):
            for j, c in enumerate(classes):
                r, col = (i + j) % 2 * 16, j % 2 * 16
                self.masks[i, r : r + 16, col : col + 16] = c
                self.images[i, :, r : r + 16, col : col + 16] += c
        self.masks[:, 0] = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.masks[i]


def save_tiny_model(path: Path, classes: list[str], grow: int = 0, history: list[dict] | None = None) -> Path:
    """Saves a randomly initialised tiny BiSeNet model directory; ``grow`` classes are added after init."""
    torch.manual_seed(0)
    model = BiSeNet(BiSeNetConfig(len(classes) - grow, "resnet10", context_channels=16, embed_channels=16))
    if grow:
        model.add_classes(grow)
    ModelBundle(model, list(classes), history or []).save(path)
    return path


def stub_model(**attributes: object) -> BiSeNet:
    """A stand-in for a BiSeNet with only the attributes that the code under test reads (e.g. sizes)."""
    return cast(BiSeNet, SimpleNamespace(**attributes))


NO_DATA = DataLoader(TinySet([], n=0))  # the (empty) loader of a context whose code under test reads no data


def make_int8_fragile(model: BiSeNet) -> None:
    """Makes classes 1 and 2 differ by a hair at every pixel (class 0 never wins), so that INT8 rounding
    flips the argmax between them while FP32 runtimes still agree: a model whose INT8 version fails."""
    classifier = model.head.classifier
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        noise = torch.randn(classifier.weight[1].shape, generator=generator)
        classifier.weight[2] = classifier.weight[1] + 1e-3 * noise
        bias_of(classifier)[2] = bias_of(classifier)[1]
        bias_of(classifier)[0] -= 100.0


def base_only(src: Path, dst: Path, keep: int) -> Path:
    """A copy of the dataset folder ``src`` listing only its first ``keep`` classes (others' pixels ->
    background): the base classes of a step 0."""
    import shutil

    import numpy as np
    from PIL import Image

    shutil.copytree(src, dst)
    names = (src / "classes.txt").read_text().split()
    (dst / "classes.txt").write_text("\n".join(names[: keep + 1]) + "\n")
    for path in (dst / "masks").glob("*.png"):
        mask = np.array(Image.open(path))
        mask[(mask > keep) & (mask != 255)] = 0
        Image.fromarray(mask).save(path)
    return dst


def to_weak(src: Path, dst: Path, splits: tuple[str, ...] = ("train",), keep_masks: int = 0) -> Path:
    """A copy of ``src`` whose ``splits`` have image-level labels (``labels.csv``, from their masks) and
    no masks, except the first ``keep_masks`` stems of each split (a mixed dataset)."""
    import shutil

    import numpy as np
    from PIL import Image

    shutil.copytree(src, dst)
    names = (dst / "classes.txt").read_text().split()
    rows = ["image,labels"]
    for split in splits:
        for stem in (dst / "splits" / f"{split}.txt").read_text().split()[keep_masks:]:
            mask_path = dst / "masks" / f"{stem}.png"
            shown = sorted(set(np.unique(np.array(Image.open(mask_path))).tolist()) - {0, 255})
            rows.append(f"{stem},{';'.join(names[c] for c in shown)}")
            mask_path.unlink()
    (dst / "labels.csv").write_text("\n".join(rows) + "\n")
    return dst
