"""Variants of the weak term (``training.methods.weak.WeakLabels``) from one saved step 0: the first
incremental step of a protocol only, trained from image-level labels, with its mIoU and its pseudo-labels'
mIoU against the true masks.

Trains step 0 once (``ft``, or the method itself for ``star``) into BASE_DIR, or loads it from there, then
runs one weak step 1 per variant with the library calls of ``incseg bench --supervision weak``
(``ProtocolData.weak_train_set``, ``train_step``, ``score_pseudo_labels``) and the options of BENCHMARKS.md's
CPU model. Used for BENCHMARKS.md, "Weak supervision: what was tried".

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weak_variants.py DATA SEED PROTOCOL METHOD BASE_DIR \\
        "{}" "{'old_wins': False}" "{'localizer_lr': 100.0, 'encoder_kd': 0}" ...

Each variant is a dict of ``WeakLabels`` arguments plus ``encoder_kd`` (``with_weak_labels``); one JSON
line per variant is printed.
"""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

from training.bench import ProtocolData
from training.data import read_source
from training.methods import build_method
from training.methods.weak import WeakLabels, with_weak_labels
from training.model_dir import ModelBundle
from training.protocols import Protocol, Setting
from training.trainer import StepOptions, train_step


def main(argv: list[str]) -> None:
    data_dir, seed, spec, method_name, base_dir = Path(argv[0]), int(argv[1]), argv[2], argv[3], Path(argv[4])
    options = StepOptions(
        epochs=8,
        size=96,
        batch_size=8,
        backbone="resnet10",
        context_channels=64,
        embed_channels=128,
        workers=0,
        seed=seed,
        setting="overlapped",
    )
    source = read_source(data_dir)
    data = ProtocolData(source, Protocol.parse(spec, len(source.classes) - 1), Setting.OVERLAPPED, options)
    method = build_method(method_name)
    if not base_dir.exists():
        base_method = method if method.needs_own_base else build_method("ft")
        bundle, _ = train_step(None, data.step_names(0), data.train_set(0), None, base_method, options)
        bundle.save(base_dir)
    base = ModelBundle.load(base_dir, aux=True)
    for text in argv[5:]:
        variant = dict(ast.literal_eval(text))
        started = time.monotonic()
        encoder_kd = float(variant.pop("encoder_kd", 1.0))
        term = WeakLabels(**variant)
        weak = with_weak_labels(method, term, encoder_kd)
        bundle, _ = train_step(base, data.step_names(1), data.weak_train_set(1), None, weak, options)
        scores = data.score(bundle, 1)
        pseudo = data.score_pseudo_labels(term, bundle, base, 1)
        row = {
            "variant": text,
            "old": scores.miou_old,
            "new": scores.miou_new,
            "all": scores.miou_all,
            "pseudo_miou": pseudo["pseudo_miou"],
            "pseudo_miou_new": pseudo["pseudo_miou_new"],
            "seconds": round(time.monotonic() - started),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
