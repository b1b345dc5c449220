"""structlog set-up: JSON lines (or console for people) carrying the current trace and span ids.

The hub logs a line per dispatched job, so a log call's cost is part of its throughput:
JSON is rendered by orjson and written as bytes, and each module's logger is bound once per
configuration instead of on every call (a filtered debug call then costs a fraction of a
microsecond, not seven).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from fedplane.runtime.telemetry import current_ids

# Bumped by configure(): loggers bound under an older configuration bind again.
_generation = 0
_level = logging.INFO
_stream: TextIO | None = None


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The current span's ids, unless the line names a trace of its own (a job's, logged where
    its span is not current): a span id from elsewhere would point into another trace."""
    if "trace_id" not in event:
        trace_id, span_id = current_ids()
        if trace_id:
            event["trace_id"] = trace_id
            event["span_id"] = span_id
    return event


_second = -1
_second_text = ""


def _add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """ISO 8601 UTC to the microsecond, as structlog's TimeStamper writes it, at a fifth of the
    cost: the text up to the second is made once a second."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    event["timestamp"] = f"{_second_text}.{int((now - second) * 1_000_000):06d}Z"
    return event


def _orjson_text(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, **kwargs).decode()


def configure(level: str | None = None, fmt: str | None = None, file: TextIO | None = None) -> None:
    """fmt "json" (default for daemons) or "console"; level from FEDPLANE_LOG_LEVEL, else info."""
    global _generation, _level, _stream
    level_name = (level or os.environ.get("FEDPLANE_LOG_LEVEL", "info")).upper()
    fmt = fmt or os.environ.get("FEDPLANE_LOG_FORMAT", "json")
    _level = getattr(logging, level_name, logging.INFO)
    # Kept: when bytes go to the stream's buffer, dropping the text stream would close it.
    out = _stream = file or sys.stderr
    binary = getattr(out, "buffer", None)
    renderer: Any
    factory: Any
    if fmt != "json":
        renderer, factory = structlog.dev.ConsoleRenderer(), structlog.PrintLoggerFactory(file=out)
    elif binary is not None:
        renderer = structlog.processors.JSONRenderer(orjson.dumps)
        factory = structlog.BytesLoggerFactory(binary)
    else:  # a text-only stream (StringIO)
        renderer = structlog.processors.JSONRenderer(_orjson_text)
        factory = structlog.PrintLoggerFactory(out)
    if binary is not None:
        out.flush()  # what was written as text so far stays ahead of the bytes
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_timestamp,
            _add_trace_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _generation += 1


def bind(**keys: Any) -> None:
    """Keys every later line of this context carries (a daemon binds its agent's cluster once, so
    the lines of code that does not know it carry it too); a line's own keys win."""
    structlog.contextvars.bind_contextvars(**keys)


def debug_enabled() -> bool:
    """Whether debug lines are written: hot paths skip preparing what only they would show."""
    return _level <= logging.DEBUG


class _Logger:
    """A module's logger: bound on first use under the current configuration, kept until the next."""

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._generation = -1

    def __getattr__(self, attr: str) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger(self._name).bind()
            self._generation = _generation
        return getattr(self._bound, attr)


def get(name: str) -> Any:
    return _Logger(name)
