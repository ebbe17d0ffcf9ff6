"""A ``star`` model (per-class sigmoids) through ``incseg export`` (parity gate) and ``incseg predict``.

The served label map must be the papers' rule: background where no class passes sigmoid 0.5, else
the class of the largest logit (STAR trainer_voc.py:182-186), computed here from the raw class logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from incseg.cli import main
from tests.helpers import TINY_OPTIONS, TinySet
from training.data import IMAGENET_MEAN, IMAGENET_STD
from training.methods import build_method
from training.methods.star_memory import STAR_MEMORY
from training.model_dir import ModelBundle
from training.trainer import train_step

SIZE = (48, 64)


@pytest.fixture(scope="module")
def star_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny star step 0, its classes calibrated so that each passes 0.5 on about a fifth of the pixels."""
    options = TINY_OPTIONS.model_copy(update={"epochs": 2, "min_iterations": 0})
    bundle, _ = train_step(
        None, ["a", "b", "c"], TinySet([1, 2, 3], n=4), None, build_method("star"), options
    )
    model = bundle.model.eval()
    with torch.no_grad():
        classifier = model.head.classifier
        logits = classifier(model.forward_features(torch.randn(4, 3, *SIZE)))  # (4, 3, 6, 8)
        classifier.bias -= logits.transpose(0, 1).flatten(1).quantile(0.8, dim=1)
    return bundle.save(tmp_path_factory.mktemp("star") / "model")


def _images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = folder / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _papers_rule(model_dir: Path, image: Path) -> np.ndarray:
    """Label map (H, W) from the raw class logits: argmax + 1, 0 where no sigmoid exceeds 0.5."""
    model = ModelBundle.load(model_dir).model.eval()
    pixels = np.asarray(Image.open(image).convert("RGB"), np.float32) / 255.0
    normalised = (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    x = torch.from_numpy(normalised.transpose(2, 0, 1).copy())[None]  # (1, 3, H, W)
    with torch.no_grad():
        raw = model.head.classifier(model.forward_features(x))[:, 1:]  # (1, C - 1, h, w), no channel 0
        probabilities = F.interpolate(raw, size=SIZE, mode="bilinear", align_corners=False).sigmoid()
    labels = probabilities.argmax(1) + 1
    labels[(probabilities > 0.5).sum(1) == 0] = 0
    return labels[0].numpy().astype(np.uint8)


def test_star_model_exports_passes_parity_and_predicts_the_papers_label_map(
    star_model: Path, tmp_path: Path
) -> None:
    assert STAR_MEMORY in ModelBundle.load(star_model).state
    export_dir = tmp_path / "export"
    size = f"{SIZE[0]}x{SIZE[1]}"
    assert main(["export", "--model", str(star_model), "--size", size, "--out", str(export_dir)]) == 0
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["model_config"]["sigmoid_outputs"] is True
    assert manifest["parity"]["argmax_agreement"] >= 0.999
    images = _images(tmp_path)
    out = tmp_path / "predictions"
    command = ["predict", "--model", str(export_dir), *map(str, images), "--out", str(out), "--size", size]
    assert main([*command, "--backend", "ort-cpu"]) == 0
    for image in images:
        predicted = np.asarray(Image.open(out / f"{image.stem}_mask.png"))
        expected = _papers_rule(star_model, image)
        assert 0.05 < (expected == 0).mean() < 0.95  # background and classes both present
        assert (predicted == expected).mean() >= 0.999
