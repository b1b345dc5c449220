"""The NATS side of the hub-agent protocol: subjects, JetStream streams and message headers.

Streams (all file-backed):
  FEDPLANE_REPORTS   heartbeat/inventory/datasets.<cluster>; only the last message per subject
                     is kept, so a (re)starting hub reads every cluster's latest state at once.
  FEDPLANE_COMMANDS  cmd.<cluster>; work queue, one durable consumer per agent: a command sent
                     while an agent is down waits for it.
  FEDPLANE_STATUS    status.<cluster>; work queue consumed by the hub.
Commands and status updates carry a Nats-Msg-Id, so a republished message within the
duplicate window is stored once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from fedplane import logs, telemetry

PREFIX = "fedplane.v1"
REPORTS_STREAM = "FEDPLANE_REPORTS"
COMMANDS_STREAM = "FEDPLANE_COMMANDS"
STATUS_STREAM = "FEDPLANE_STATUS"
MSG_TYPE_HEADER = "Fedplane-Type"
DUPLICATE_WINDOW_SECONDS = 600.0
log = logs.get("fedplane.bus")
_TOKEN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def valid_cluster_name(name: str) -> bool:
    """Cluster names become subject tokens and label values: a DNS label."""
    return len(name) <= 63 and bool(_TOKEN.match(name))


def subject(kind: str, cluster: str) -> str:
    return f"{PREFIX}.{kind}.{cluster}"


def cluster_of(subject_name: str) -> str:
    return subject_name.rsplit(".", 1)[1]


def consumer_name(cluster: str) -> str:
    return f"agent-{cluster}"


def stream_configs(max_age: float) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=REPORTS_STREAM,
            subjects=[f"{PREFIX}.heartbeat.*", f"{PREFIX}.inventory.*", f"{PREFIX}.datasets.*"],
            retention=RetentionPolicy.LIMITS,
            max_msgs_per_subject=1,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=COMMANDS_STREAM,
            subjects=[f"{PREFIX}.cmd.*"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=max_age,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        ),
        StreamConfig(
            name=STATUS_STREAM,
            subjects=[f"{PREFIX}.status.*"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=max_age,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        ),
    ]


async def ensure_streams(js: JetStreamContext, max_age: float) -> None:
    """Create the streams, or bring an existing stream's configuration up to date."""
    for config in stream_configs(max_age):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


async def connect(
    url: str,
    name: str,
    *,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    max_wait: float = 10.0,
) -> NATS:
    """Connect, retrying the first connection too (an edge agent may start while its link is down)."""

    async def disconnected() -> None:
        if on_disconnect:
            await on_disconnect()

    async def reconnected() -> None:
        if on_reconnect:
            await on_reconnect()

    async def error(exc: Exception) -> None:
        pass

    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((OSError, nats.errors.NoServersError, TimeoutError)),
        wait=wait_exponential(multiplier=0.2, max=max_wait),
        reraise=True,
    ):
        with attempt:
            return await nats.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=2,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
    raise AssertionError("unreachable")


def headers(
    msg_type: str, msg_id: str | None = None, trace: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Message headers: type, dedup id, and the trace context (current span unless given)."""
    out = dict(trace) if trace is not None else telemetry.inject()
    out[MSG_TYPE_HEADER] = msg_type
    if msg_id:
        out["Nats-Msg-Id"] = msg_id
    return out


async def batches(
    sub: Any, size: int, stopping: Callable[[], bool], window: float = 0.1
) -> AsyncIterator[list[Any]]:
    """Batches from a pull subscription until `stopping()`; rides out timeouts and lost links.

    nats-py's long-poll fetch keeps collecting until it has `size` messages or `window`
    passes, so the window bounds the latency a trickle of messages sees at each hop.
    """
    while not stopping():
        try:
            msgs = await sub.fetch(size, timeout=window)
        except TimeoutError:
            continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("fetch failed", subject=sub.subject if hasattr(sub, "subject") else "", error=str(exc))
            await asyncio.sleep(0.5)
            continue
        yield msgs


def trace_headers(msg: Any) -> dict[str, str]:
    return {k: v for k, v in (msg.headers or {}).items() if k in ("traceparent", "tracestate")}
