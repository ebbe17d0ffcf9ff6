"""Shared fixtures: tiny model configurations and small synthetic datasets made by the project."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data import write_synthetic_dataset
from training.trainer import StepOptions


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six foreground classes, 48 px: big enough for every class to appear in train and val."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", 6, 36, 12, 48, seed=3)


@pytest.fixture
def tiny_options() -> StepOptions:
    return StepOptions(
        epochs=1,
        batch_size=4,
        size=48,
        backbone="resnet10",
        context_channels=16,
        embed_channels=16,
        workers=0,
        min_iterations=0,  # one epoch, as given (the iteration floor has its own tests)
    )
