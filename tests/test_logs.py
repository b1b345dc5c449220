"""Log lines are JSON an operator's pipeline can parse, and follow the latest configuration."""

from __future__ import annotations

import datetime
import io
import json
from collections.abc import Iterator

import pytest

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
