"""Which optional parts of the install are present: commands that train say what to install instead of
failing on an import deep inside.

The ``api`` extra serves exported models without PyTorch; training, export and the PyTorch backend need
the ``train`` extra.
"""

from __future__ import annotations

import importlib.util

TRAIN_EXTRA_MODULES = ("torch", "torchvision")


class MissingExtraError(RuntimeError):
    """A command needs a part of the install (a pyproject extra) that is not installed."""


def train_extra_installed() -> bool:
    """True when PyTorch and torchvision can be imported (the ``train`` extra is installed)."""
    return all(importlib.util.find_spec(module) is not None for module in TRAIN_EXTRA_MODULES)


def require_train_extra(command: str) -> None:
    """Raises ``MissingExtraError`` naming ``command`` and the install line when the extra is absent.

    Raises:
        MissingExtraError: torch or torchvision is not installed.
    """
    if not train_extra_installed():
        raise MissingExtraError(f"{command} needs the train extra: pip install 'incseg[train]'")
