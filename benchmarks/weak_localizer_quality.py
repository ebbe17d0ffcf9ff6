"""How good are the weak term's pseudo-labels before the step: the localizer warmed up on the old model's
embedding (``WeakLabels.warm_up``), its pseudo-labels on the step's training images against their true
masks, for several PAMR iteration counts and cutoffs (``refine_iterations``, ``cutoff``). No model is
trained: the old model is both the model and the teacher, as at the step's first iteration. Used for
BENCHMARKS.md, "Weak supervision: what was tried".

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weak_localizer_quality.py DATA SEED PROTOCOL BASE_DIR

BASE_DIR is a step-0 model directory (e.g. the one ``benchmarks/weak_variants.py`` saves). Prints one
JSON line per (refine_iterations, cutoff): IoU of background and of each new class, and their mean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.bench import ProtocolData
from training.data import read_source
from training.data.dataset import WeakItem
from training.methods.weak import Localizer, WeakLabels
from training.metrics import ConfusionMatrix
from training.model_dir import ModelBundle
from training.protocols import Protocol, Setting
from training.trainer import StepOptions

REFINE_ITERATIONS = (0, 10, 30)
CUTOFFS = (0.0, 0.5, 0.7)


def main(argv: list[str]) -> None:
    data_dir, seed, spec, base_dir = Path(argv[0]), int(argv[1]), argv[2], Path(argv[3])
    options = StepOptions(
        epochs=8, size=96, batch_size=8, backbone="resnet10", context_channels=64, embed_channels=128,
        workers=0, seed=seed, setting="overlapped",
    )  # fmt: skip
    source = read_source(data_dir)
    data = ProtocolData(source, Protocol.parse(spec, len(source.classes) - 1), Setting.OVERLAPPED, options)
    old = ModelBundle.load(base_dir, aux=False).model.eval()
    num_old, total = old.num_classes, old.num_classes + len(data.step_names(1))
    torch.manual_seed(seed)
    term = WeakLabels()
    term.localizer = Localizer(old.embed_dim, total)
    loader = DataLoader(data.weak_train_set(1), batch_size=options.batch_size, shuffle=True, drop_last=True)
    term.warm_up(loader, old, num_old, torch.device("cpu"))
    confusions = {(r, c): ConfusionMatrix(total) for r in REFINE_ITERATIONS for c in CUTOFFS}
    item: WeakItem
    for item in DataLoader(data.masked_train_items(1), batch_size=options.batch_size):
        for (refine, cutoff), confusion in confusions.items():
            term.refine_iterations, term.cutoff = refine, cutoff
            confusion.update(term.label_images(old, old, item.image, item.image_labels), item.mask)
    for (refine, cutoff), confusion in confusions.items():
        iou = confusion.iou()
        new = [float(iou[c]) for c in range(num_old, total)]
        row = {
            "refine_iterations": refine,
            "cutoff": cutoff,
            "background": float(iou[0]),
            "new": new,
            "mean_new": sum(new) / len(new),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
