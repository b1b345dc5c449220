"""Hypothesis strategies for hostile protobuf payloads, and a way to run hypothesis against a
federation living in the test's event loop.

Four kinds of payload, all as bytes: random bytes; a valid message with bytes flipped,
inserted, deleted or cut off (mostly still parsing, with something off inside); a message
built field by field from its descriptor, with extreme values (huge strings, out-of-range
enums, NaN, negative counts, long lists); and a valid message with one or two of its fields
set to such values, which gets past the first checks into the code behind them. `hints` steer string
fields by name towards values that reach deeper code (an existing job id, a known cluster).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

T = TypeVar("T")
Hints = Mapping[str, Sequence[str]]

# Strings that break naive code: empty, control characters, path tricks, subject wildcards,
# the longest valid name and one past it, and sizes well past every limit.
_NASTY_STRINGS = st.sampled_from(
    [
        "",
        "a",
        "default",
        "\n",
        "name\n",
        "a.b",
        "*",
        ">",
        "fedplane.v1.status.x",
        "../../etc",
        "/",
        "a/b/c",
        "Ünïcödé",
        "\x00",
        "x" * 63,
        "x" * 64,
        "x" * 254,
        "j" * 2000,
        # JSON that breaks parsers: nested past any recursion limit, an integer too long to
        # convert, and a manifest whose simulated duration is infinite.
        "[" * 5000 + "]" * 5000,
        '{"apiVersion": "v1", "kind": "Job", "x": ' + "9" * 5000 + "}",
        '{"apiVersion": "v1", "kind": "Job",'
        ' "metadata": {"annotations": {"fedplane.io/simulated-duration": "inf"}}}',
    ]
)
_SMALL_STRINGS = st.one_of(_NASTY_STRINGS, st.text(max_size=24))
_STRINGS = st.one_of(_SMALL_STRINGS, st.integers(1, 200_000).map(lambda n: "r" * n))
_NUMBERS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}
_SMALL_INTS = st.one_of(st.integers(-3, 12), st.sampled_from([0, 1, 100_000, 100_001, 2**31 - 1]))


def _scalar(field: Any, hints: Hints, big: bool = True) -> st.SearchStrategy[Any]:
    """Values for a scalar field; `big` allows strings past every limit (not in long lists)."""
    if field.type == FieldDescriptor.TYPE_STRING:
        strings = _STRINGS if big else _SMALL_STRINGS
        hinted = hints.get(field.name)
        return st.one_of(st.sampled_from(list(hinted)), strings) if hinted else strings
    if field.type == FieldDescriptor.TYPE_ENUM:
        # Open enums keep unknown numbers: a peer may send any.
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 1000))
    if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
        return st.one_of(_SMALL_INTS, _NUMBERS[field.type])
    return _NUMBERS[field.type]


def _is_map(field: Any) -> bool:
    return bool(field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry)


@st.composite
def _fill(draw: st.DrawFn, descriptor: Any, hints: Hints, depth: int, big: bool = True) -> dict[str, Any]:
    """Field values for a message of `descriptor` by field name (see `_scalar` for `big`)."""
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if _is_map(field):
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                continue  # no message-valued maps in the API's requests
            size = draw(st.one_of(st.integers(0, 4), st.just(200)))
            values[field.name] = draw(
                st.dictionaries(
                    _scalar(key_field, hints, big and size < 10),
                    _scalar(value_field, hints, big and size < 10),
                    max_size=size,
                )
            )
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 4:
                continue
            if field.is_repeated:
                size = draw(st.one_of(st.integers(0, 3), st.sampled_from([9, 300])))
                item = _fill(field.message_type, hints, depth + 1, big and size < 10)
                values[field.name] = draw(st.lists(item, max_size=size))
            else:
                values[field.name] = draw(_fill(field.message_type, hints, depth + 1, big))
        elif field.is_repeated:
            size = draw(st.one_of(st.integers(0, 3), st.just(2000)))
            values[field.name] = draw(st.lists(_scalar(field, hints, big and size < 10), max_size=size))
        else:
            values[field.name] = draw(_scalar(field, hints, big))
    return values


def built(cls: type[Message], hints: Hints) -> st.SearchStrategy[bytes]:
    """Serialized messages of `cls` built from its fields."""

    def make(values: dict[str, Any]) -> bytes:
        message = _construct(cls, values)
        return message.SerializeToString()

    return _fill(cls.DESCRIPTOR, hints, 0).map(make)


def _construct(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field: Any = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if _is_map(field):
            target.update(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.is_repeated:
            for item_values in value:
                item = target.add()
                item.MergeFrom(_construct(type(item), item_values))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.MergeFrom(_construct(type(target), value))
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def _leaf_paths(descriptor: Any, depth: int = 0) -> list[tuple[str, ...]]:
    """Every field that holds values (not messages), as attribute paths, to 4 levels down."""
    paths: list[tuple[str, ...]] = []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            if depth < 4:
                paths += [(field.name, *rest) for rest in _leaf_paths(field.message_type, depth + 1)]
        else:
            paths.append((field.name,))
    return paths


@st.composite
def tweaked(draw: st.DrawFn, cls: type[Message], seeds: Sequence[bytes], hints: Hints) -> bytes:
    """A valid seed with one or two fields set to extreme values, the rest left valid: past the
    first checks, into the code behind them."""
    message = cls.FromString(draw(st.sampled_from(list(seeds))))
    paths = _leaf_paths(cls.DESCRIPTOR)
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=2)):
        target: Any = message
        for name in path[:-1]:
            field = target.DESCRIPTOR.fields_by_name[name]
            child = getattr(target, name)
            if field.is_repeated:
                if not child:
                    child.add()
                child = child[draw(st.integers(0, len(child) - 1))]
            target = child
        field = target.DESCRIPTOR.fields_by_name[path[-1]]
        if _is_map(field):
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            if value.type != FieldDescriptor.TYPE_MESSAGE:
                getattr(target, path[-1])[draw(_scalar(key, hints))] = draw(_scalar(value, hints))
        elif field.is_repeated:
            getattr(target, path[-1]).append(draw(_scalar(field, hints)))
        else:
            setattr(target, path[-1], draw(_scalar(field, hints)))
    return message.SerializeToString()


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A seed with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(list(seeds))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "duplicate":
            data += data[at:]
    return bytes(data)


def payloads(cls: type[Message], seeds: Sequence[bytes], hints: Hints) -> st.SearchStrategy[bytes]:
    """Every kind of hostile payload for a message of `cls`."""
    kinds = [st.binary(max_size=256), built(cls, hints)]
    if seeds:
        kinds += [mutated(seeds), tweaked(cls, seeds, hints)]
    return st.one_of(kinds)


def fuzz_settings(examples: int) -> settings:
    """A bounded run: no deadline (a real hub answers in its own time), no example database.
    FEDPLANE_FUZZ_EXAMPLES=N runs N examples instead, for a longer hunt by hand."""
    return settings(
        max_examples=int(os.environ.get("FEDPLANE_FUZZ_EXAMPLES", examples)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


async def run_examples(
    strategy: st.SearchStrategy[T],
    check: Callable[[T], Awaitable[None]],
    examples: int,
    timeout: float = 30.0,
) -> None:
    """Run hypothesis over `strategy`, each example checked by `check` in this event loop.

    Hypothesis runs its (synchronous) search in a worker thread, and each example is handed to
    the running loop, where the federation lives: shrinking and failure reports work as usual.
    """
    loop = asyncio.get_running_loop()

    @fuzz_settings(examples)
    @given(strategy)
    def search(example: T) -> None:
        asyncio.run_coroutine_threadsafe(_call(check, example), loop).result(timeout)

    await asyncio.to_thread(search)


async def _call(check: Callable[[T], Awaitable[None]], example: T) -> None:
    await check(example)
