"""Typed accessors for parsed YAML, shared by job spec files (`spec`) and queue object files
(`objects`), so both check shapes and word their errors alike.

Each accessor takes a value and its field path ("podSets[0].requests.cpu") and returns the value
typed, or raises `FieldError` naming that path; each loader turns it into its own one-line error
with the file and document in front.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from fedplane.core import quantity as quantities

__all__ = [
    "FieldError",
    "boolean",
    "fail",
    "int32",
    "integer",
    "join",
    "label_value",
    "mapping",
    "quantity",
    "string",
    "string_map",
    "type_name",
]

_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
}


class FieldError(Exception):
    """Raised deep in a conversion; the loader adds the file and document index."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def fail(path: str, message: str) -> NoReturn:
    raise FieldError(path, message)


def type_name(value: object) -> str:
    """The YAML word for a value's type, as errors say it ("got a list")."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def join(path: str, key: str | int) -> str:
    """The path of a mapping's field (`key`) or a list's item (`index`)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def mapping(value: object, path: str, allowed: set[str] | None = None) -> Mapping[str, Any]:
    """A mapping with string keys, all of them in `allowed` when given (typos are errors)."""
    if not isinstance(value, Mapping):
        fail(path, f"expected a mapping, got {type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            fail(path, f"keys must be strings, got {key!r}")
        if allowed is not None and key not in allowed:
            fail(join(path, key), f"unknown field (expected one of: {', '.join(sorted(allowed))})")
    return value


def string(value: object, path: str) -> str:
    if not isinstance(value, str):
        fail(path, f"expected a string, got {type_name(value)} {value!r}")
    return value


def boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        fail(path, f"expected true or false, got {type_name(value)} {value!r}")
    return value


def integer(value: object, path: str) -> int:
    """An int, not a bool (which Python counts as one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(path, f"expected an integer, got {type_name(value)} {value!r}")
    return value


def int32(value: object, path: str) -> int:
    """An integer that fits the protobuf int32 field it is bound for."""
    number = integer(value, path)
    if not -(2**31) <= number < 2**31:
        fail(path, f"{number} is out of range")
    return number


def quantity(resource: str, value: object, path: str, *, examples: str) -> int:
    """A Kubernetes-style quantity ("500m", "64Gi", 2) in `resource`'s base unit; `examples`
    shows the reader valid forms when the value is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        fail(path, f"{value!r} is not a quantity (examples: {examples})")
    try:
        return quantities.parse(resource, value)
    except quantities.QuantityError:
        fail(path, f"{value!r} is not a quantity (examples: {examples})")


def label_value(value: object, path: str, *, booleans: bool = True) -> str:
    """Scalars become strings, so `tier: 1` works as people expect from Kubernetes labels;
    `booleans=False` rejects true and false rather than spelling them out."""
    if isinstance(value, bool) and booleans:
        return "true" if value else "false"
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return str(value)
    fail(path, f"expected a string, got {type_name(value)}")


def string_map(value: object, path: str, *, booleans: bool = True) -> dict[str, str]:
    """A mapping of label-like values (see `label_value`)."""
    return {
        key: label_value(item, join(path, key), booleans=booleans)
        for key, item in mapping(value, path).items()
    }
