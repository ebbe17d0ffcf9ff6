"""WeakSegmentationDataset: weak samples give an ignored mask and their image labels; batches are WeakItem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import to_weak
from training.data import (
    Sample,
    SegmentationDataset,
    WeakItem,
    WeakSegmentationDataset,
    eval_transform,
    read_source,
)
from training.protocols import label_lut


def test_weak_and_masked_samples_in_one_batch(synth_dataset: Path, tmp_path: Path) -> None:
    weak_dir = to_weak(synth_dataset, tmp_path / "weak", keep_masks=1)
    source = read_source(weak_dir)
    masked, weak = source.train[0], source.train[1]
    assert not masked.is_weak and weak.is_weak and weak.image_labels
    # the step trains classes 5 and 6 (model 1 and 2); 1..4 are old (-> background)
    lut = label_lut({0: 0, 5: 1, 6: 2})
    dataset = WeakSegmentationDataset([masked, weak], len(source.classes), lut, 3, eval_transform(32))
    items = [dataset[0], dataset[1]]
    assert all(isinstance(item, WeakItem) for item in items)
    assert (items[1].mask == 255).all() and bool(items[1].weak) and not bool(items[0].weak)
    expected = {lut[c] for c in weak.image_labels} - {0, 255}
    assert set(torch.nonzero(items[1].image_labels).flatten().tolist()) == expected
    pairs = SegmentationDataset([masked], len(source.classes), lut, eval_transform(32))
    assert torch.equal(items[0].mask, pairs[0][1])  # a masked sample serves its mask
    shown = set(items[0].mask.unique().tolist()) - {0, 255}
    assert set(torch.nonzero(items[0].image_labels).flatten().tolist()) >= shown
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert isinstance(batch, WeakItem)
    assert batch.image.shape == (2, 3, 32, 32) and batch.mask.shape == (2, 32, 32)
    assert batch.image_labels.shape == (2, 3) and batch.weak.tolist() == [False, True]


def test_label_table_beyond_the_label_space_is_refused(synth_dataset: Path) -> None:
    source = read_source(synth_dataset)
    with pytest.raises(ValueError, match="num_labels"):
        WeakSegmentationDataset(
            source.train, len(source.classes), label_lut({0: 0, 1: 3}), 3, eval_transform(32)
        )


def test_image_labels_follow_the_label_table(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    sample = Sample("a", image, None, frozenset({1, 2, 3}))
    dataset = WeakSegmentationDataset([sample], 4, label_lut({0: 0, 2: 1, 3: 2}), 3, eval_transform(8))
    assert dataset.image_labels(0) == frozenset({1, 2})  # class 1 is not in the step: no label
