"""The one configuration mechanism: frozen dataclasses whose fields are type- and range-checked on
construction and round-trip through JSON.

A config class derives from :class:`JsonConfig` and declares its fields with type annotations;
ranges and choices go into :func:`param`'s metadata. Construction checks every field and names
the field in a :class:`~stylenat.errors.ConfigError`; lists become tuples and integers become
floats where the annotation asks for them, so a config read back from JSON compares equal to the
one written. Cross-field rules go into the class's ``_check`` method.

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``dict``, ``Literal[...]``,
``tuple[T, ...]``, ``tuple[T1, T2]``, and ``X | None``, nested.

Each field is documented by the string literal just under it; :func:`field_docs` reads those, so
the command line's help and the docs' tables come from the same text (``stylenat train --help``).
:func:`parse_text` reads a field's value from command-line text by its annotation.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

from stylenat._system import atomic_path
from stylenat.errors import ConfigError, MissingFileError

__all__ = ["JsonConfig", "bounds", "field_docs", "field_types", "param", "parse_text"]


def param(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, min=None, max=None, gt=None):
    """A dataclass field with a range: ``min <= value``, ``value <= max``, ``value > gt`` (numbers,
    or every number inside a tuple)."""
    meta = {k: v for k, v in (("min", min), ("max", max), ("gt", gt)) if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def bounds(metadata) -> str:
    """A field's range as text, e.g. ">= 0 and <= 1" ("" without one), from :func:`param`'s metadata."""
    low, high, above = metadata.get("min"), metadata.get("max"), metadata.get("gt")
    parts = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
             f"<= {high}" if high is not None else ""]
    return " and ".join(p for p in parts if p)


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Field name -> the first paragraph of the string literal under the field in ``cls``'s source
    (its docstring), whitespace normalised; "" for a field without one."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split("\n\n")[0].split())
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def field_types(cls) -> dict:
    """Field name -> its annotation, resolved (``int``, ``tuple[float, float]``, ``str | None``, ...)."""
    return _hints(cls)


NULL_WORDS = ("none", "null")  # what parse_text reads as None for an ``X | None`` field


def parse_text(text: str, tp, where: str) -> Any:
    """``text`` from a command line read as type ``tp``: numbers, ``true``/``false``, a Literal's
    value, a list separated by commas or spaces for a tuple (``0,0.99``; "" is the empty list),
    JSON for a dict, and ``none`` or ``null`` for None where ``tp`` allows it. ``where`` names the
    option in the :class:`ConfigError` raised for text that is none of these (ranges are the
    config's to check)."""
    try:
        return _from_text(text.strip(), tp)
    except _Mismatch:
        raise ConfigError(f"{where}: cannot read {text!r}; give {_describe(tp)}") from None


def _from_text(text: str, tp) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in NULL_WORDS and type(None) in args:
            return None
        for option in args:
            if option is not type(None):
                try:
                    return _from_text(text, option)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is tuple:
        items = [t for t in re.split(r"[,\s]+", text) if t]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_text(t, args[0]) for t in items)
        if len(items) != len(args):
            raise _Mismatch
        return tuple(_from_text(t, a) for t, a in zip(items, args))
    if origin is Literal:
        for option in args:
            if text == str(option):
                return option
        raise _Mismatch
    try:
        if tp is bool:
            return {"true": True, "false": False}[text.lower()]
        if tp is int:
            number = float(text.replace("_", ""))  # 1e6 and 1_000_000 too
            if not number.is_integer():
                raise _Mismatch
            return int(text) if re.fullmatch(r"[+-]?[\d_]+", text) else int(number)  # int(): exact beyond 2**53
        if tp is float:
            number = float(text)
            if not math.isfinite(number):  # nan passes every range check
                raise _Mismatch
            return number
        if tp is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise _Mismatch
            return value
    except (KeyError, ValueError, OverflowError):
        raise _Mismatch from None
    if tp is str:
        return text
    raise TypeError(f"unsupported config annotation {tp!r}")


def _describe(tp) -> str:
    """How a type reads in an error message: 'an integer', 'a list of 2 numbers', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is dict:
        return "a JSON object"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in inner)
        return text + " or null" if type(None) in args else text
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return "a list of " + ", ".join(_describe(a) for a in args)
    return str(tp)


def _plural(tp) -> str:
    text = _describe(tp)
    for single, plural in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if text == single:
            return plural
    if text.startswith("a list of "):
        return "lists of " + text[len("a list of "):]
    return text


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp) -> Any:
    """``value`` as type ``tp`` (lists -> tuples, integral numbers -> int, ints -> float), or _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 from JSON
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    raise TypeError(f"unsupported config annotation {tp!r}")


def _numbers(value) -> list:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, tuple):
        return [n for v in value for n in _numbers(v)]
    return []


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=False)


class JsonConfig:
    """Base of the frozen config dataclasses (see the module docstring)."""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                value = _coerce(value, hints[f.name])
            except _Mismatch:
                raise ConfigError(f"{self._where(f.name)} must be {_describe(hints[f.name])}, got {value!r}") from None
            for n in _numbers(value):
                if n != n:  # NaN passes every range comparison
                    raise ConfigError(f"{self._where(f.name)} must be a number, got {value!r}")
                low, high, above = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("gt")
                if (low is not None and n < low) or (high is not None and n > high) or (above is not None and n <= above):
                    raise ConfigError(f"{self._where(f.name)} must be {bounds(f.metadata)}, got {value!r}")
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Rules between fields; raise ConfigError naming them."""

    def _where(self, name: str) -> str:
        return f"{type(self).__name__}.{name}"

    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict):
        """The config from a dict of field values; unknown fields are a ConfigError naming them."""
        if not isinstance(values, dict):
            raise ConfigError(f"a {cls.__name__} needs a JSON object of fields, got {values!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            hints = [f"{u!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(u, names, 1)) else repr(u)
                     for u in unknown]
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(hints)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.__name__} needs the field(s) {', '.join(missing)}")
        return cls(**values)

    def replace(self, **changes):
        """A copy with some fields changed (checked like a new config)."""
        return type(self).from_dict({**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes})

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        """Read a config written by :meth:`save`; a missing or unreadable file is a user error."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path} not found")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); restore it or start a new run") from None
        return cls.from_dict(values)
