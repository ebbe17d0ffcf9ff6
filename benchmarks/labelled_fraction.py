"""Fraction of labelled (non-255) pixels per training batch, as ``incseg bench`` loads them.

A cross-entropy averaged over all pixels (ignored ones counting 0) equals the mean over labelled
pixels times this fraction, so its distribution is how much the two means differ (BENCHMARKS.md,
"The cross-entropy mean of ft, lwf, ilt and joint"). Command::

    .venv/bin/python benchmarks/labelled_fraction.py synth20 --protocol 15-1-1 --size 96
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from training.bench import ProtocolData
from training.data.sources import read_source
from training.protocols import Protocol, Setting
from training.trainer import StepOptions


def batch_fractions(dataset: Dataset, batch_size: int, epochs: int) -> torch.Tensor:
    """(epochs * batches,) labelled fraction of each shuffled training batch."""
    fractions = [
        (labels != 255).float().mean()
        for _ in range(epochs)
        for _, labels in DataLoader(dataset, batch_size=batch_size, shuffle=True)
    ]
    return torch.stack(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--protocol", default="15-1-1")
    parser.add_argument("--setting", default="overlapped")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    source = read_source(args.data)
    options = StepOptions(size=args.size, batch_size=args.batch_size, setting=args.setting)
    protocol = Protocol.parse(args.protocol, len(source.classes) - 1)
    data = ProtocolData(source, protocol, Setting(args.setting), options)
    sets = {"step 0": data.train_set(0), "step 1": data.train_set(1), "joint": data.joint_train_set()}
    for name, dataset in sets.items():
        f = batch_fractions(dataset, args.batch_size, args.epochs)
        print(f"{name}: {len(f)} batches, mean {f.mean():.3f}, min {f.min():.3f}, max {f.max():.3f}")


if __name__ == "__main__":
    main()
