"""Incremental-learning methods: build them by name (``mib``) or combination (``mib+sdr``)."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable

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
}


def split_top_level(text: str, separator: str) -> list[str]:
    """Splits on ``separator`` outside parentheses: ``"mib(kd=1,x=2),ft"`` -> ``["mib(kd=1,x=2)", "ft"]``."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _parse_part(part: str) -> tuple[str, dict]:
    """``"mib(kd=100)"`` -> ``("mib", {"kd": 100})``; arguments must be Python literals."""
    match = re.fullmatch(r"([A-Za-z_]+)\s*(?:\((.*)\))?", part.strip(), flags=re.DOTALL)
    if match is None:
        raise ValueError(f"bad method {part!r}: write a name, optionally with arguments, e.g. mib(kd=100)")
    name, arguments = match.group(1).lower(), match.group(2)
    if not arguments or not arguments.strip():
        return name, {}
    try:
        call = ast.parse(f"f({arguments})", mode="eval").body
        if call.args:
            raise ValueError("positional")
        return name, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"bad arguments in {part!r}: use keyword=literal pairs, e.g. mib(kd=100)") from err


def build_method(spec: str) -> Method:
    """Builds ``name``, ``name(arg=value, ...)`` or combinations ``a+b``: the terms of each part are summed.

    Arguments override a method's default weights, e.g. ``mib(kd=100)+sdr(sparsity=1e-4)`` or
    ``alife(memory_size=200)``.

    Raises:
        ValueError: Unknown name or argument, or a combination with no or two classification losses.
    """
    parsed = [_parse_part(part) for part in split_top_level(spec, "+")]
    unknown = [name for name, _ in parsed if name not in METHODS]
    if not parsed or unknown:
        raise ValueError(f"unknown method {spec!r}; choose from {', '.join(METHODS)} or combine with '+'")
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
