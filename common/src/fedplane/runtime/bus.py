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
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from fedplane.runtime import logs, telemetry

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
    return f"agent-{cluster}-push"


def legacy_consumer_name(cluster: str) -> str:
    """The pull consumer earlier versions of the agent used (see consume's `replaces`)."""
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


async def consume(
    js: JetStreamContext,
    subject_filter: str,
    durable: str,
    stream: str,
    config: ConsumerConfig,
    size: int,
    stopping: Callable[[], bool],
    replaces: str = "",
) -> AsyncIterator[list[Any]]:
    """Batches from a durable push consumer: as soon as one message is in, with whatever else is.

    A pull consumer's fetch in nats-py holds a lone message until its batch fills or its
    window passes, which put up to a window of latency on every hop. A push consumer hands
    each message over as it arrives, and under load the messages that arrived meanwhile make
    the batch. The consumer is durable with explicit acks, so delivery is at least once across
    restarts, and bound as a deliver group, so a restarted process takes it over at once.
    Messages delivered but not handed out when the loop stops are nak'ed for prompt redelivery.
    `replaces` names the pull consumer of earlier versions, removed first: a work-queue
    stream allows one consumer per subject, and its unacked messages are redelivered to this one.
    """
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    async def deliver(msg: Any) -> None:
        inbox.put_nowait(msg)

    if replaces:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, replaces)
    sub = None
    while sub is None and not stopping():
        try:
            sub = await js.subscribe(
                subject_filter,
                queue=durable,
                durable=durable,
                stream=stream,
                cb=deliver,
                manual_ack=True,
                config=config,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("waiting to consume", stream=stream, durable=durable, error=str(exc))
            await asyncio.sleep(1.0)
    try:
        while not stopping():
            try:
                first = await asyncio.wait_for(inbox.get(), timeout=0.5)
            except TimeoutError:
                continue
            batch = [first]
            while len(batch) < size and not inbox.empty():
                batch.append(inbox.get_nowait())
            yield batch
    finally:
        # Bounded: on a connection that is closing, these may never complete.
        if sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 2)
        left = [inbox.get_nowait() for _ in range(inbox.qsize())]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(m.nak() for m in left), return_exceptions=True), 2)


async def publish_all(
    js: JetStreamContext, messages: Sequence[tuple[str, bytes, dict[str, str]]], ack_wait: float = 5.0
) -> list[BaseException | None]:
    """Publish (subject, payload, headers) messages and wait for all their acks at once.

    One request per message, each awaited in its own task, costs more than the message;
    asynchronous publishes share one reply subscription and are all in flight together.
    The result says, per message, whether JetStream stored it (None) or why not.
    """
    sent: list[asyncio.Future[Any] | BaseException] = []
    for subject_name, payload, hdrs in messages:
        try:
            sent.append(await js.publish_async(subject_name, payload, headers=hdrs))
        except Exception as exc:
            sent.append(exc)
    waiting = [f for f in sent if isinstance(f, asyncio.Future)]
    if waiting:
        await asyncio.wait(waiting, timeout=ack_wait)
    results: list[BaseException | None] = []
    for item in sent:
        if isinstance(item, BaseException):
            results.append(item)
        elif not item.done():
            item.cancel()
            results.append(TimeoutError(f"no acknowledgement from JetStream within {ack_wait}s"))
        else:
            results.append(item.exception())
    return results


def trace_headers(msg: Any) -> dict[str, str]:
    return {k: v for k, v in (msg.headers or {}).items() if k in ("traceparent", "tracestate")}
