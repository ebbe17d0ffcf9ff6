"""Incremental-learning methods: build them by name (``mib``) or combination (``mib+sdr``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from training.method_spec import parse_method_spec, split_top_level
from training.methods import alife, plop, sdr, star
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
    "star": star.star,
    "star_reference": star.star_reference,
}


def build_method(spec: str) -> Method:
    """Builds ``name``, ``name(arg=value, ...)`` or combinations ``a+b``: the terms of each part are summed.

    Arguments override a method's default weights, e.g. ``mib(kd=100)+sdr(sparsity=1e-4)`` or
    ``alife(memory_size=200)``.

    Raises:
        ValueError: Unknown name or argument, or a combination with no or two classification losses.
    """
    parsed = parse_method_spec(spec)
    parts = []
    for name, kwargs in parsed:
        try:
            parts.append(METHODS[name](**kwargs))
        except TypeError as err:
            allowed = ", ".join(inspect.signature(METHODS[name]).parameters)
            raise ValueError(f"method {name!r}: {err}; its arguments are: {allowed}") from err
    terms = [term for part in parts for term in part.terms]
    term_names = [t.name for t in terms]
    if len(set(term_names)) != len(term_names):
        duplicated = sorted({n for n in term_names if term_names.count(n) > 1})
        raise ValueError(f"method {spec!r} repeats the loss {duplicated}")
    if sum(t.classifies for t in terms) != 1:
        raise ValueError(f"method {spec!r} needs exactly one classification loss (mib+sdr, not sdr alone)")
    frozen_scopes = [name for p in parts if p.freeze_batchnorm for name in p.batchnorm_modules]
    return Method(
        spec.replace(" ", ""),
        terms,
        trains_all_classes_at_once=any(p.trains_all_classes_at_once for p in parts),
        freeze_batchnorm=any(p.freeze_batchnorm for p in parts),
        batchnorm_modules=tuple(dict.fromkeys(frozen_scopes)) or ("",),
    )


__all__ = ["METHODS", "Batch", "LossTerm", "Method", "StepContext", "build_method", "split_top_level"]
