"""Incremental-learning methods: build them by name (``mib``) or combination (``mib+sdr``)."""

from __future__ import annotations

from collections.abc import Callable

from training.methods import alife, plop, sdr
from training.methods.base import Batch, LossTerm, Method, StepContext
from training.methods.standard import ft, ilt, joint, lwf, mib

# Method name -> builder with the reference repositories' default weights.
METHODS: dict[str, Callable[[], Method]] = {
    "ft": ft,
    "joint": joint,
    "lwf": lwf,
    "ilt": ilt,
    "mib": mib,
    "sdr": sdr.sdr,
    "alife": alife.alife,
    "plop": plop.plop,
}


def build_method(spec: str) -> Method:
    """Builds ``name`` or ``name+name+...``: the terms of each part are summed.

    Raises:
        ValueError: Unknown name, or a combination with no or two classification losses.
    """
    names = [part.strip() for part in spec.lower().split("+") if part.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise ValueError(f"unknown method {spec!r}; choose from {', '.join(METHODS)} or combine with '+'")
    parts = [METHODS[n]() for n in names]
    terms = [term for part in parts for term in part.terms]
    term_names = [t.name for t in terms]
    if len(set(term_names)) != len(term_names):
        duplicated = sorted({n for n in term_names if term_names.count(n) > 1})
        raise ValueError(f"method {spec!r} repeats the loss {duplicated}")
    if sum(t.classifies for t in terms) != 1:
        raise ValueError(f"method {spec!r} needs exactly one classification loss (mib+sdr, not sdr alone)")
    return Method("+".join(names), terms, any(p.trains_all_classes_at_once for p in parts))


__all__ = ["METHODS", "Batch", "LossTerm", "Method", "StepContext", "build_method"]
