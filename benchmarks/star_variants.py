"""Several ``star`` variants from one saved ``star`` step 0: the incremental steps of a protocol only.

Each variant of ``incseg bench`` would train its own step 0 (star's is its own, with BCE); this script
trains it once (or loads it from ``BASE_DIR``) and runs every variant's steps 1..N from it, with the
library calls of ``incseg bench`` (``train_step``, ``evaluate``) and the options of BENCHMARKS.md's CPU
model. Used to choose ``star``'s ``max_replay_weight`` and its new rows' rate (BENCHMARKS.md, "Why star
caps its replay and trains its new rows faster").

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/star_variants.py [--size 128] DATA SEED PROTOCOL SETTING \\
        BASE_DIR OUT.json "star(max_replay_weight=1)" "star(max_replay_weight=0.5)" ...

``--size`` is the training crop and evaluation size (96, the tables' size, unless given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from training.bench import ProtocolData, step_record
from training.data import read_source
from training.methods import build_method
from training.methods.star import StarClassification
from training.model_dir import ModelBundle
from training.protocols import Protocol, Setting
from training.trainer import StepOptions, train_step


@torch.no_grad()
def base_pixels_went_to(bundle: ModelBundle, data: ProtocolData, step: int) -> dict[str, float]:
    """Where the validation pixels of the base classes (step 0's, model indices 1..) were predicted.

    Tells a base class lost to the new classes (what the replay guards against) from one lost to the
    background or to another base class (what feature drift does).
    """
    num_base = len(data.protocol.seen(0))  # background + base classes
    model = bundle.model.eval()
    went = torch.zeros(4)  # correct, background, another base class, a new class
    for images, labels in data.val_loader(step):
        predictions = model(images).argmax(dim=1)  # (B, H, W)
        base = (labels > 0) & (labels < num_base)
        truth, predicted = labels[base], predictions[base]
        went += torch.stack(
            [
                (predicted == truth).sum(),
                (predicted == 0).sum(),
                ((predicted != truth) & (predicted > 0) & (predicted < num_base)).sum(),
                (predicted >= num_base).sum(),
            ]
        ).float()
    shares = went / went.sum().clamp_min(1)
    return dict(zip(("correct", "background", "other_base", "new"), shares.tolist(), strict=True))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("positional", nargs="+", metavar="DATA SEED PROTOCOL SETTING BASE_DIR OUT VARIANT")
    args = parser.parse_args(argv)
    data_dir, seed, protocol_spec, setting, base_dir, out, *variants = args.positional
    options = StepOptions(
        epochs=8,
        batch_size=8,
        size=args.size,
        seed=int(seed),
        workers=0,
        backbone="resnet10",
        context_channels=64,
        embed_channels=128,
        setting=setting,
    )
    source = read_source(Path(data_dir))
    protocol = Protocol.parse(protocol_spec, len(source.classes) - 1)
    data = ProtocolData(source, protocol, Setting(setting), options)

    base_path = Path(base_dir)
    if not (base_path / "model.json").exists():
        started = time.monotonic()
        base, _ = train_step(None, data.step_names(0), data.train_set(0), None, build_method("star"), options)
        base.save(base_path)
        print(
            f"step 0: {time.monotonic() - started:.0f} s, all {data.score(base, 0).miou_all:.3f}", flush=True
        )
    results = {}
    for spec in variants:
        torch.manual_seed(options.seed)
        bundle = ModelBundle.load(base_path, aux=True)
        method = build_method(spec)
        steps = [step_record(0, data, bundle, data.score(bundle, 0), 0)]
        for step in range(1, protocol.num_steps):
            started = time.monotonic()
            bundle, _ = train_step(bundle, data.step_names(step), data.train_set(step), None, method, options)
            record = step_record(
                step, data, bundle, data.score(bundle, step), 0, round(time.monotonic() - started, 1)
            )
            record["base_pixels_went_to"] = base_pixels_went_to(bundle, data, step)
            replay = method.terms[0]
            assert isinstance(replay, StarClassification)
            record["fakes_per_iteration"] = int(replay.fakes_per_iteration.sum())
            record["background_ratio"] = round(replay.background_ratio, 3)
            steps.append(record)
            print(
                f"{spec} step {step}: old {record['miou_old']:.3f} new {record['miou_new']:.3f} "
                f"all {record['miou_all']:.3f}, its classes {record['miou_step']:.3f}, base pixels "
                + " ".join(f"{k} {v:.3f}" for k, v in record["base_pixels_went_to"].items())
                + f", fakes {record['fakes_per_iteration']}/it, background x{record['background_ratio']}",
                flush=True,
            )
        final = {key: steps[-1][key] for key in ("miou_old", "miou_new", "miou_all", "hiou")}
        results[spec] = {"steps": steps, "final": final}
        Path(out).write_text(json.dumps({"protocol": protocol_spec, "setting": setting, "methods": results}))


if __name__ == "__main__":
    main(sys.argv[1:])
