"""Method specs (``mib``, ``mib(kd=100)``, ``mib+sdr``) parsed without PyTorch.

``training.methods.build_method`` builds a spec into loss terms (that needs torch); the API of an
install without the ``train`` extra checks with :func:`parse_method_spec` what it can: the syntax and
the method names. The names here are the keys of ``training.methods.METHODS`` (a test keeps them equal).
"""

from __future__ import annotations

import ast
import re

METHOD_NAMES = ("ft", "joint", "lwf", "ilt", "mib", "sdr", "alife", "plop", "star", "star_reference")

# Methods whose models have per-class sigmoid outputs and their own step 0 (``Method.needs_own_base``;
# a test keeps the two equal). A model continues only with a method of its own family.
SIGMOID_METHODS = ("star", "star_reference")

# The method of `incseg step`, of the demo's incremental step, of a service task posted without one,
# and the first of `incseg bench`. STAR (with its replay weight capped, training.methods.star): the
# only method that beats MiB in every protocol of BENCHMARKS.md ("Every method, three protocols, two
# data seeds").
DEFAULT_METHOD = "star"
BENCH_METHODS = (DEFAULT_METHOD, "mib", "alife", "plop", "mib(kd=100)+sdr", "ft", "joint")


def split_top_level(text: str, separator: str) -> list[str]:
    """Splits on ``separator`` outside parentheses: ``"mib(kd=1,x=2),ft"`` -> ``["mib(kd=1,x=2)", "ft"]``."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_part(part: str) -> tuple[str, dict]:
    """``"mib(kd=100)"`` -> ``("mib", {"kd": 100})``; arguments must be Python literals."""
    match = re.fullmatch(r"([A-Za-z_]+)\s*(?:\((.*)\))?", part.strip(), flags=re.DOTALL)
    if match is None:
        raise ValueError(f"bad method {part!r}: write a name, optionally with arguments, e.g. mib(kd=100)")
    name, arguments = match.group(1).lower(), match.group(2)
    if not arguments or not arguments.strip():
        return name, {}
    try:
        call = ast.parse(f"f({arguments})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("not keyword arguments of one call")
        return name, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"bad arguments in {part!r}: use keyword=literal pairs, e.g. mib(kd=100)") from err


def parse_method_spec(spec: str) -> list[tuple[str, dict]]:
    """The ``(name, arguments)`` of each ``+``-separated part of ``spec``.

    Raises:
        ValueError: Empty spec, bad syntax or an unknown method name.
    """
    parsed = [parse_part(part) for part in split_top_level(spec, "+")]
    unknown = [name for name, _ in parsed if name not in METHOD_NAMES]
    if not parsed or unknown:
        choices = ", ".join(METHOD_NAMES)
        raise ValueError(f"unknown method {spec!r}; choose from {choices} or combine with '+'")
    return parsed


def sigmoid_family(spec: str) -> bool:
    """Whether a method spec trains per-class sigmoids (``star``) rather than a softmax.

    Raises:
        ValueError: The spec does not parse.
    """
    return any(parse_part(part)[0] in SIGMOID_METHODS for part in split_top_level(spec, "+"))


def check_continuation(model: str, sigmoid_model: bool, method: str, sigmoid_method: bool) -> None:
    """Refuses a method of another kind than the model it continues.

    A model with per-class sigmoid outputs (trained with ``star``) continues only with ``star``, a softmax
    model only with the other methods.

    Args:
        model: What the model is, for the message (e.g. "the active model v3 was trained with star").
        sigmoid_model: Whether the model has per-class sigmoid outputs.
        method: The method's name or spec, for the message.
        sigmoid_method: Whether the method trains per-class sigmoids (:func:`sigmoid_family` of a spec,
            ``Method.needs_own_base`` of a built method).

    Raises:
        ValueError: ``method`` is of the other kind; the message names the model and what to use instead.
    """
    if sigmoid_method == sigmoid_model:
        return
    family, example = ("per-class sigmoids", "star") if sigmoid_model else ("a softmax", "e.g. mib")
    raise ValueError(
        f"{model} ({family}); {method} cannot continue it: use a method of the same kind ({example})"
    )
