"""Typed settings read from YAML: a frozen dataclass is the schema of one section.

Each field that is a key is declared once, with its default and its check (`setting`, `section`,
`required`); `parse` walks the fields, so unknown keys, wrong types and values out of range all
fail with the full key path (`smtp.data_timeout`) in the message. A section class may define
`validate(self, path)` for checks that involve several of its keys.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any, TypeVar

T = TypeVar("T")
# A check takes the YAML value and its key path and returns the typed value, or raises ConfigError.
Check = Callable[[Any, str], Any]


class ConfigError(Exception):
    """Invalid configuration; the message names the file and the key path and says what was expected."""


def setting(default: Any, check: Check) -> Any:
    """A key with its default and its check."""
    return field(default=default, metadata={"check": check})


def required(check: Check, hint: str) -> Any:
    """A key without a default; `hint` says how to set it when it is missing."""
    return field(metadata={"check": check, "missing": hint})


def section(cls: type) -> Any:
    """A nested section: absent or null means all of its defaults (and is checked, for its required
    keys). It has a default itself where all of its keys have one."""
    metadata = {"check": lambda value, key: parse(cls, value, key), "section": True}
    if any(f.default is MISSING and f.default_factory is MISSING for f in fields(cls)):
        return field(metadata=metadata)
    return field(default_factory=cls, metadata=metadata)


def keys(cls: type) -> list[Field]:
    """The fields of `cls` that are keys in the YAML (not bookkeeping such as `Config.source`)."""
    return [f for f in fields(cls) if "check" in f.metadata]


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def kind(value: Any) -> str:
    """How a wrong value is shown in an error: its YAML type and value."""
    return "nothing (null)" if value is None else f"{type(value).__name__} {value!r}"


def mapping(data: Any, path: str, allowed: list[str]) -> dict:
    """`data` as a mapping with only `allowed` keys; null is the empty mapping."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'top level'}: expected a mapping, got {kind(data)}")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            guess = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"{_join(path, key)}: unknown key (expected one of: {', '.join(allowed)}){guess}"
            )
    return data


def parse(cls: type[T], data: Any, path: str) -> T:
    """The section `cls` read from `data` at key path `path` ("" for the top level)."""
    given = mapping(data, path, [f.name for f in keys(cls)])
    values = {}
    for f in keys(cls):
        key = _join(path, f.name)
        value = given.get(f.name)
        if value is None and "missing" in f.metadata:
            raise ConfigError(f"{key}: not set ({f.metadata['missing']})")
        if f.name in given or f.metadata.get("section"):
            values[f.name] = f.metadata["check"](value, key)
    parsed = cls(**values)
    validate = getattr(parsed, "validate", None)
    if validate is not None:
        validate(path)
    return parsed


def optional(check: Check) -> Check:
    """`check`, with null meaning "not set" (None)."""
    return lambda value, key: None if value is None else check(value, key)


def integer(minimum: int = 1) -> Check:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {kind(value)}")
        if value < minimum:
            raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value}")
        return value

    return check


def number(positive: bool = True) -> Check:
    def check(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {kind(value)}")
        if not math.isfinite(value):  # YAML's .nan and .inf: a timeout of nan drops every session
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        if positive and value <= 0:
            raise ConfigError(f"{key}: expected a number > 0, got {value}")
        return float(value)

    return check


def text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {kind(value)}")
    return value


def choice(*options: str) -> Check:
    """One of `options`, in any case; the lower-case form is kept."""

    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ConfigError(f"{key}: expected one of: {', '.join(options)}; got {value!r}")
        return value.lower()

    return check


def pattern(regex: str, expected: str) -> Check:
    """A string matching `regex` whole; `expected` describes it in the error."""

    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or not re.fullmatch(regex, value):
            raise ConfigError(f"{key}: expected {expected}; got {value!r}")
        return value

    return check


def string_list(lower: bool = False, item: Check | None = None) -> Check:
    """A string or a non-empty list of strings, stripped; `item` checks each one further."""

    def check(value: Any, key: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{key}: expected a string or a non-empty list of strings, got {kind(value)}")
        for i, entry in enumerate(items):
            if not isinstance(entry, str) or not entry.strip():
                raise ConfigError(f"{key}[{i}]: expected a non-empty string, got {kind(entry)}")
        cleaned = tuple(entry.strip().lower() if lower else entry.strip() for entry in items)
        for i, entry in enumerate(cleaned):
            if item is not None:
                item(entry, f"{key}[{i}]")
        return cleaned

    return check
