"""``name:k=v,k=v`` specs for attacks and defenses, checked against a registry of functions.

A registered function declares its parameters as keyword-only arguments with defaults and type
annotations; the spec's values are converted by annotation (``4/255`` is accepted wherever a
float is). Unknown names and parameters raise :class:`ValueError` listing the valid ones.
"""
from __future__ import annotations

import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["Spec", "parse_spec", "spec_name", "spec_params", "parse_value", "safe_name"]


@dataclass(frozen=True)
class Spec:
    """A parsed spec: registry ``name``, converted ``params`` and the ``text`` as given."""

    name: str
    params: Mapping[str, typing.Any] = field(default_factory=dict)
    text: str = ""

    def __post_init__(self):
        if not self.text:
            object.__setattr__(self, "text", format_spec(self.name, self.params))
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    def __reduce__(self):  # MappingProxyType does not pickle; Beam pickles specs
        return (Spec, (self.name, dict(self.params), self.text))

    @property
    def identity(self) -> str:
        """The spec whatever way it was written: its name and values, parameters sorted
        (``pgd:steps=3,eps=4/255`` and ``pgd:eps=0.01568627450980392,steps=3`` are one spec; a value
        written with fewer digits, such as ``0.0156862745098``, is another number, and defaults are
        not filled in, so ``pgd`` and ``pgd:steps=10`` differ). Seeds hash this, so the same attack
        draws the same random numbers however its parameters are ordered."""
        return format_spec(self.name, {k: repr(self.params[k]) for k in sorted(self.params)})

    @property
    def folder(self) -> str:
        """A filesystem-safe, injective folder name for this spec (see :func:`safe_name`)."""
        return safe_name(self.text)


def format_spec(name: str, params: Mapping[str, typing.Any]) -> str:
    if not params:
        return name
    return name + ":" + ",".join(f"{k}={v}" for k, v in params.items())


def spec_params(fn: Callable) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of a registered function: the spec's vocabulary."""
    sig = inspect.signature(fn)
    return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _parse_number(text: str, kind: type) -> float | int:
    t = text.strip()
    if kind is int:
        if not re.fullmatch(r"[+-]?\d+", t):
            raise ValueError(f"expected an integer, got {text!r}")
        return int(t)
    try:
        value = Fraction(t) if "/" in t else float(t)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number such as 0.03 or 8/255, got {text!r}") from None
    try:
        return float(value)
    except OverflowError:  # a fraction beyond float's range is inf, as float("1e400") is
        return math.inf if value > 0 else -math.inf


def parse_value(text: str, annotation: typing.Any) -> typing.Any:
    """Convert ``text`` by a type annotation: int, float, bool, str, Literal, unions, Optional."""
    if isinstance(annotation, str):
        raise TypeError("annotations must be evaluated (no `from __future__ import annotations`)")
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        for c in choices:
            if str(c) == text.strip():
                return c
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {text!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if annotation is bool:
        t = text.strip().lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if annotation in (int, float):
        return _parse_number(text, annotation)
    if annotation is str:
        return text.strip()
    raise TypeError(f"unsupported parameter type {annotation!r}")


def parse_spec(
    text: str,
    registry: Mapping[str, Callable],
    *,
    kind: str = "spec",
    overrides: Mapping[str, typing.Any] | None = None,
    hidden: tuple[str, ...] = ("seeds",),
) -> Spec:
    """Parse ``name[:k=v,...]`` against ``registry``; raise ValueError naming the bad part.

    ``overrides`` gives the spec-level type of parameters whose function-level type is not
    textual (an attack's ``target`` tensor is named by class index or strategy in a spec);
    ``hidden`` parameters are filled by the runner and cannot be set from a spec.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty {kind} spec")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r} in {text!r}; valid: {', '.join(sorted(registry))}")
    fn = registry[name]
    allowed = {k: p for k, p in spec_params(fn).items() if k not in hidden}
    hints = {**typing.get_type_hints(fn), **(overrides or {})}
    params: dict[str, typing.Any] = {}
    if rest.strip():
        for item in rest.split(","):
            k, eq, v = item.partition("=")
            k = k.strip()
            if not eq or not k:
                raise ValueError(f"malformed {kind} spec {text!r}: expected k=v, got {item!r}")
            if k not in allowed:
                valid = ", ".join(allowed) or "none"
                raise ValueError(f"unknown parameter {k!r} for {kind} {name!r}; valid: {valid}")
            if k in params:
                raise ValueError(f"parameter {k!r} given twice in {text!r}")
            try:
                params[k] = parse_value(v, hints.get(k, str))
            except ValueError as e:
                raise ValueError(f"bad value for {k!r} in {kind} spec {text!r}: {e}") from None
    return Spec(name, params, text.strip())


def spec_name(text: str) -> str:
    """A spec text's registry name as :func:`parse_spec` reads it: ``jpeg`` for ``JPEG:quality=30``
    (a spec's text is kept as written)."""
    return text.strip().partition(":")[0].strip().lower()


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def safe_name(text: str) -> str:
    """A readable filesystem- and URL-safe folder name for a spec text.

    ``jpeg:quality=50`` -> ``jpeg-quality=50``; ``fgsm:eps=4/255`` -> ``fgsm-eps=4_255``. Distinct
    specs of one run that would share a folder are rejected when the run is configured.
    """
    out = text.strip().replace(":", "-").replace(",", "-").replace("/", "_")
    out = _UNSAFE.sub("_", out)
    return out if out.strip(".") else f"_{out}"
