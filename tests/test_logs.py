"""Log lines are JSON an operator's pipeline can parse, and follow the latest configuration."""

from __future__ import annotations

import contextvars
import datetime
import io
import json
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

from fedplane.runtime import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logs.configure("warning", "console")  # as tests/conftest.py sets it


def test_a_logger_made_before_configure_writes_json_lines_as_configured_later() -> None:
    log = logs.get("fedplane.test")
    log.warning("before")  # bound under the earlier configuration
    out = io.StringIO()
    logs.configure("info", "json", file=out)
    log.info("job dispatched", job_id="j1", cluster="c1", generation=1, score=0.5)
    log.debug("not written at info")
    (line,) = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "job dispatched" and entry["level"] == "info"
    assert (entry["job_id"], entry["cluster"], entry["generation"], entry["score"]) == ("j1", "c1", 1, 0.5)
    stamp = datetime.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
    assert stamp.tzinfo == datetime.UTC
    assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 5
    assert not logs.debug_enabled()


def test_debug_level_writes_debug_lines() -> None:
    out = io.StringIO()
    logs.configure("debug", "json", file=out)
    logs.get("fedplane.test").debug("detail", why="asked")
    assert json.loads(out.getvalue())["why"] == "asked"
    assert logs.debug_enabled()


def test_a_line_names_the_current_span_unless_it_names_a_trace_of_its_own() -> None:
    out = io.StringIO()
    logs.configure("info", "json", file=out)
    log = logs.get("fedplane.test")
    current = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0x00F067AA0BA902B7, is_remote=False
    )
    with trace.use_span(NonRecordingSpan(current)):
        log.info("workload created", job_id="j1", cluster="c1")
        log.info("job dispatched", job_id="j2", trace_id="0af7651916cd43dd8448eb211c80319c")
    log.info("hub serving")
    inside, own, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert (inside["trace_id"], inside["span_id"]) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    # A span id from the current trace would point into another trace than the line names.
    assert own["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and "span_id" not in own
    assert "trace_id" not in outside and "span_id" not in outside


def test_bound_keys_reach_every_line_of_their_context_and_a_line_own_keys_win() -> None:
    out = io.StringIO()
    logs.configure("info", "json", file=out)
    log = logs.get("fedplane.test")

    def agent() -> None:
        logs.bind(cluster="c1")
        log.info("agent started")
        log.info("orphan query dropped", cluster="c2")

    contextvars.copy_context().run(agent)
    log.info("elsewhere")
    started, dropped, elsewhere = (json.loads(line) for line in out.getvalue().splitlines())
    assert (started["cluster"], dropped["cluster"]) == ("c1", "c2")
    assert "cluster" not in elsewhere
