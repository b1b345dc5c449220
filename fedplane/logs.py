"""structlog set-up: JSON lines (or console for people) carrying the current trace id."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from fedplane.telemetry import current_trace_id


def _add_trace_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    trace_id = current_trace_id()
    if trace_id and "trace_id" not in event:
        event["trace_id"] = trace_id
    return event


def configure(level: str | None = None, fmt: str | None = None, file: TextIO | None = None) -> None:
    """fmt "json" (default for daemons) or "console"; level from FEDPLANE_LOG_LEVEL, else info."""
    level_name = (level or os.environ.get("FEDPLANE_LOG_LEVEL", "info")).upper()
    fmt = fmt or os.environ.get("FEDPLANE_LOG_FORMAT", "json")
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_id,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=file or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)
