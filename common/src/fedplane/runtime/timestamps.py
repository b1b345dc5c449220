"""protobuf Timestamps, made directly: the well-known type's GetCurrentTime and FromNanoseconds
are Python code several times slower, and agents stamp every status update and report."""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp

_NS = 1_000_000_000


def at(seconds: float) -> Timestamp:
    nanos = int(seconds * 1e9)
    return Timestamp(seconds=nanos // _NS, nanos=nanos % _NS)


def now() -> Timestamp:
    nanos = time.time_ns()
    return Timestamp(seconds=nanos // _NS, nanos=nanos % _NS)
