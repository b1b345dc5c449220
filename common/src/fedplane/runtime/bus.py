"""The NATS side of the hub-agent protocol: subjects, streams, consumers, acks and requests.

Every call into nats-py from the hub and the agent goes through here, so the protocol's
choices (which consumer, which acks, which deliver policy, which headers) are made once and
read in one place, and the daemons hold plain types: `Connection`, `JetStream`, `Message`.

Streams (all file-backed):
  FEDPLANE_REPORTS   heartbeat/inventory/datasets.<cluster>; only the last message per subject
                     is kept, so a (re)starting hub reads every cluster's latest state at once.
  FEDPLANE_COMMANDS  cmd.<cluster>; work queue, one durable consumer per agent: a command sent
                     while an agent is down waits for it.
  FEDPLANE_STATUS    status.<cluster>; work queue consumed by the hub.
Commands and status updates travel in batches, which JetStream does not deduplicate (a retried
batch may hold other items): both sides apply them idempotently instead.
Requests (core NATS, not stored): gc.<cluster>, an agent's orphan query, answered by one hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
import urllib.parse
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Container,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

import nats
import orjson
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from tenacity import AsyncRetrying, retry_if_exception, retry_if_exception_type, wait_exponential

from fedplane.runtime import logs, natsjwt, telemetry
from fedplane.v1 import agent_pb2 as agent_pb

# The daemons' names for nats-py's types, so that they need not import nats themselves.
Connection: TypeAlias = NATS
JetStream: TypeAlias = JetStreamContext
Message: TypeAlias = Msg
Subscription: TypeAlias = NatsSubscription


class Incoming(Protocol):
    """What reading a delivered message takes: nats-py's Msg has it, and so can a test's fake."""

    @property
    def data(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, str] | None: ...


class Ackable(Protocol):
    """What settling a JetStream message takes: nats-py's Msg has it, and so can a test's fake."""

    async def ack(self) -> None: ...
    async def nak(self, delay: float | None = None) -> None: ...


PREFIX = "fedplane.v1"
REPORTS_STREAM = "FEDPLANE_REPORTS"
COMMANDS_STREAM = "FEDPLANE_COMMANDS"
STATUS_STREAM = "FEDPLANE_STATUS"
MSG_TYPE_HEADER = "Fedplane-Type"
DUPLICATE_WINDOW_SECONDS = 600.0
REPORT_KINDS = ("heartbeat", "inventory", "datasets")
# The hub's durable status consumer, and the pull consumer of earlier hubs it replaces.
STATUS_CONSUMER = "hub-statuses"
LEGACY_STATUS_CONSUMER = "hub"
# The queue group of the hubs answering agents' requests: exactly one of them answers each.
HUB_QUEUE = "hub"
# An agent's NATS connection is named this and its cluster.
AGENT_NAME_PREFIX = "fedplane-agent-"
log = logs.get("fedplane.bus")
_TOKEN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def valid_cluster_name(name: str) -> bool:
    """Cluster names become subject tokens and label values: a DNS label."""
    return len(name) <= 63 and bool(_TOKEN.fullmatch(name))  # fullmatch: "$" also matches before "\n"


def subject(kind: str, cluster: str) -> str:
    return f"{PREFIX}.{kind}.{cluster}"


def cluster_of(subject_name: str) -> str:
    """The cluster token of `<prefix>.<kind>.<cluster>` ("" for a subject without one)."""
    return subject_name.rpartition(".")[2]


def kind_of(subject_name: str) -> str:
    """The kind token of `<prefix>.<kind>.<cluster>`: one callback serves every kind of report."""
    return subject_name.split(".")[-2]


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


@dataclass(frozen=True)
class Credentials:
    """Who connects to NATS, and over what: an NKey seed (the hub's identity, or an agent's own),
    a bootstrap token beside it (an agent asking to join), the inbox prefix its permissions
    allow, and TLS. The default is an anonymous plaintext connection (an insecure setup)."""

    seed: bytes = b""
    token: str = ""
    inbox_prefix: str = ""
    tls: ssl.SSLContext | None = None


def tls_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext | None:
    """A client TLS context checking the server against `ca_file` (None: plaintext)."""
    if not ca_file:
        return None
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


def agent_connection_name(cluster: str) -> str:
    """An agent's NATS connection name: the auth callout reads the cluster it asks to be from it."""
    return f"{AGENT_NAME_PREFIX}{cluster}"


def agent_inbox_prefix(cluster: str) -> str:
    """The inbox prefix of `cluster`'s agent: its replies (JetStream acks, API answers, the hub's
    answers) arrive under it, and no other agent may subscribe there. A hub's own inboxes are
    `_INBOX.<nuid>`, which never contain '-', so the two never meet."""
    return f"_INBOX.fedplane-agent.{cluster}"


def agent_permissions(cluster: str, js_domain: str = "") -> natsjwt.Permissions:
    """What `cluster`'s agent may do on NATS, and nothing more: publish its own reports, status
    batches and orphan queries; read its own command consumer (which the hub creates, see
    `ensure_command_consumer`), acknowledge what it delivers; receive its own replies. It may
    publish no command and read no other cluster's subjects."""
    stream, consumer = COMMANDS_STREAM, consumer_name(cluster)
    api = [
        f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
        # Removing the pull consumer of earlier agents (see `consume`'s `replaces`): denied,
        # the request would wait out its timeout before every start.
        f"$JS.API.CONSUMER.DELETE.{stream}.{legacy_consumer_name(cluster)}",
    ]
    if js_domain:
        # At an edge site's leaf node, which maps the API to the hub's domain and checks the
        # permissions after mapping (`js_domain`: the hub's JetStream domain).
        api += [name.replace("$JS.API.", f"$JS.{js_domain}.API.", 1) for name in api]
    return natsjwt.Permissions(
        publish=(
            *(subject(kind, cluster) for kind in (*REPORT_KINDS, "status", "gc")),
            *api,
            f"$JS.ACK.{stream}.{consumer}.>",
        ),
        subscribe=(f"{agent_inbox_prefix(cluster)}.>", deliver_subject(cluster)),
    )


def site_permissions(clusters: Sequence[str], js_domain: str) -> natsjwt.Permissions:
    """What an edge site's leaf node link may carry into and out of the hub's account: its own
    clusters' agents' subjects and nothing more (the JetStream API as the leaf maps it into the
    hub's domain). The site's nats-server holds each agent to its own cluster; this holds the
    site itself, so whoever controls it still cannot publish a command or another site's status.
    On a leaf connection, `publish` is what the site may send to the hub and `subscribe` what
    the hub may send to the site."""
    publish: list[str] = []
    subscribe: list[str] = []
    for cluster in clusters:
        allowed = agent_permissions(cluster, js_domain)
        publish += [name for name in allowed.publish if not name.startswith("$JS.API.")]
        subscribe += allowed.subscribe
    return natsjwt.Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def deliver_subject(cluster: str) -> str:
    """Where `cluster`'s command consumer pushes its messages (only that agent may subscribe)."""
    return f"{PREFIX}.deliver.{cluster}"


async def ensure_command_consumer(js: JetStreamContext, cluster: str) -> None:
    """Create `cluster`'s command consumer from the hub, delivering to the agent's own subject.

    Under NATS permissions an agent may not create consumers: a consumer it defined could name
    another cluster's commands as its filter. The hub makes it instead, with the filter and the
    deliver subject fixed, and the agent only binds to it. A consumer an earlier agent made
    (delivering to an inbox of its own choosing) is replaced; its unacknowledged commands stay
    in the work-queue stream and go to the new one.
    """
    name = consumer_name(cluster)
    try:
        info = await js.consumer_info(COMMANDS_STREAM, name)
    except NotFoundError:
        info = None
    if info is not None and info.config.deliver_subject == deliver_subject(cluster):
        return
    if info is not None:
        await js.delete_consumer(COMMANDS_STREAM, name)
    config = command_consumer_config()
    config.durable_name = name
    config.deliver_subject = deliver_subject(cluster)
    config.deliver_group = name
    config.filter_subject = subject("cmd", cluster)
    await js.add_consumer(COMMANDS_STREAM, config=config)


async def delete_command_consumer(js: JetStreamContext, cluster: str) -> None:
    """Stop delivering `cluster`'s commands (a removed cluster): none reaches its agent again."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(COMMANDS_STREAM, consumer_name(cluster))


async def disconnect_clients(system: Connection, account: str, name: str, within: float = 2.0) -> int:
    """Close every connection named `name` in `account`, on every server, through nats-server's
    system account (`system` must be a system-account user): how many were closed. A revoked
    client's reconnect then goes through the auth callout again, which refuses it."""
    inbox = system.new_inbox()
    replies: asyncio.Queue[Msg] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        replies.put_nowait(msg)

    sub = await system.subscribe(inbox, cb=collect)
    closed = 0
    try:
        request = orjson.dumps({"acc": account, "limit": 100_000})
        await system.publish("$SYS.REQ.SERVER.PING.CONNZ", request, reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (left := deadline - loop.time()) > 0:
            try:
                reply = await asyncio.wait_for(replies.get(), left)
            except TimeoutError:
                break
            data = orjson.loads(reply.data)
            server = (data.get("server") or {}).get("id", "")
            for conn in (data.get("data") or {}).get("connections") or []:
                if conn.get("name") == name and server:
                    kick = orjson.dumps({"cid": conn["cid"]})
                    await system.request(f"$SYS.REQ.SERVER.{server}.KICK", kick, timeout=within)
                    closed += 1
    finally:
        await sub.unsubscribe()
    return closed


def _authorization_refused(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()


def without_credentials(url: str) -> str:
    """`url` (one or several, comma-separated) without user names and passwords, for the log."""
    parts = []
    for one in url.split(","):
        split = urllib.parse.urlsplit(one.strip())
        host = split.netloc.rpartition("@")[2]
        parts.append(urllib.parse.urlunsplit(split._replace(netloc=host)) if split.netloc else one.strip())
    return ",".join(parts)


# A daemon that cannot reach NATS says so at once, then at doubling intervals up to this many
# seconds apart, for as long as it tries: never silent, never a line a second for hours.
UNREACHABLE_REPORT_MAX_SECONDS = 10.0


class _Attempts:
    """The failed attempts of one connection to reach NATS (nats-py retries by itself, forever,
    and tells only its error callback), said in the log while they last."""

    def __init__(self, url: str, name: str) -> None:
        self.server = without_credentials(url)
        self.name = name
        self.connected = False
        self.ever_connected = False
        self._failures = 0
        self._since = 0.0
        self._next_report = 0.0
        self._gap = 1.0

    def failed(self, exc: BaseException) -> None:
        why = str(exc) or type(exc).__name__
        if self.connected:  # an error on a live connection (a slow consumer, a permission)
            log.debug("NATS error", connection=self.name, error=why)
            return
        now = time.monotonic()
        if not self._failures:
            self._since, self._next_report, self._gap = now, now, 1.0
        self._failures += 1
        if now < self._next_report:
            return
        self._next_report = now + self._gap
        self._gap = min(self._gap * 2, UNREACHABLE_REPORT_MAX_SECONDS)
        log.warning(
            "NATS refused this identity; retrying (an agent waits for approval)"
            if _authorization_refused(exc)
            else "cannot reach NATS; retrying",
            server=self.server,
            connection=self.name,
            error=why,
            attempts=self._failures,
            waiting_seconds=round(now - self._since, 1),
        )

    def up(self) -> None:
        if self._failures and not self.ever_connected:
            log.info(
                "connected to NATS",
                server=self.server,
                connection=self.name,
                attempts=self._failures + 1,
                waited_seconds=round(time.monotonic() - self._since, 1),
            )
        self.connected = self.ever_connected = True
        self._failures = 0

    def down(self) -> None:
        self.connected = False


async def connect(
    url: str,
    name: str,
    *,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    max_wait: float = 10.0,
    credentials: Credentials = Credentials(),
) -> NATS:
    """Connect, retrying the first connection too: an edge agent may start while its link is
    down, and an agent asking to join is refused until an administrator approves it."""

    attempts = _Attempts(url, name)

    async def disconnected() -> None:
        attempts.down()
        if on_disconnect:
            await on_disconnect()

    async def reconnected() -> None:
        attempts.up()
        if on_reconnect:
            await on_reconnect()

    async def error(exc: Exception) -> None:
        attempts.failed(exc)

    options: dict[str, Any] = {}
    if credentials.seed:
        options["nkeys_seed_str"] = credentials.seed.decode()
    if credentials.token:
        options["token"] = credentials.token
    if credentials.inbox_prefix:
        options["inbox_prefix"] = credentials.inbox_prefix
    if credentials.tls is not None:
        options["tls"] = credentials.tls
    refusals = 0

    def refused(exc: BaseException) -> bool:
        nonlocal refusals
        if not _authorization_refused(exc):
            return False
        refusals += 1
        if refusals == 1 or refusals % 30 == 0:
            log.warning("NATS refused this identity; retrying (an agent waits for approval)", name=name)
        return True

    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((OSError, nats.errors.NoServersError, TimeoutError))
        | retry_if_exception(refused),
        wait=wait_exponential(multiplier=0.2, max=max_wait),
        reraise=True,
    ):
        with attempt:
            connection = await nats.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=2,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
                **options,
            )
            attempts.up()
            return connection
    raise AssertionError("unreachable")


# The W3C trace context as header values: a context given with a message comes from a job's
# record or an update a peer sent, so it may carry anything; only these shapes reach a header.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE = re.compile(r"[\x21-\x7e]([\x20-\x7e]{0,510}[\x21-\x7e])?")


def header_trace(trace: Mapping[str, str]) -> dict[str, str]:
    """`trace`'s traceparent and tracestate, when they are W3C-shaped; nothing else.

    A header carrying a line break or a stray field would corrupt the NATS protocol line or be
    refused, and an agent's status batch whose publish never succeeds holds up every later one.
    """
    parent = trace.get("traceparent", "")
    if not _TRACEPARENT.fullmatch(parent):
        return {}
    out = {"traceparent": parent}
    state = trace.get("tracestate", "")
    if state and _TRACESTATE.fullmatch(state):
        out["tracestate"] = state
    return out


def headers(
    msg_type: str, msg_id: str | None = None, trace: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Message headers: type, dedup id, and the trace context (current span unless given)."""
    out = header_trace(trace) if trace is not None else telemetry.inject()
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
) -> AsyncGenerator[list[Any], None]:
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


# ---------------------------------------------------------------------- connection


def jetstream(nc: Connection) -> JetStream:
    return nc.jetstream()


async def close(nc: Connection) -> None:
    """Close the connection; callers bound it, since a connection that is down may never close."""
    await nc.close()


async def unsubscribe(sub: Subscription) -> None:
    await sub.unsubscribe()


# ---------------------------------------------------------------------- reports (agent -> hub)


async def publish_report(
    js: JetStream, kind: str, cluster: str, payload: bytes, ack_wait: float = 5.0
) -> None:
    """Publish a heartbeat, inventory or datasets report; it replaces the cluster's last one.

    Reports carry no headers: the subject says what they are, and no trace follows them.
    """
    await js.publish(subject(kind, cluster), payload, timeout=ack_wait)


async def subscribe_latest_reports(
    js: JetStream,
    on_report: Callable[[Message], Awaitable[None]],
    kinds: Sequence[str] = REPORT_KINDS,
) -> list[Subscription]:
    """Every cluster's latest report of each kind, then every new one, to `on_report`.

    Ordered consumers delivering the last message per subject: a hub that (re)starts reads
    each cluster's current state at once without replaying its history, and needs no durable
    state or acks for reports, since a newer report supersedes any it missed.
    """
    subs: list[Subscription] = []
    for kind in kinds:
        subs.append(
            await js.subscribe(
                f"{PREFIX}.{kind}.*",
                stream=REPORTS_STREAM,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                cb=on_report,
            )
        )
    return subs


def stored_at(msg: Message) -> float | None:
    """When the NATS server stored a JetStream message (seconds since the epoch), if known.

    The hub judges a cluster's health by this rather than by the agent's clock, which may be off.
    """
    return msg.metadata.timestamp.timestamp() if msg.metadata else None


# ---------------------------------------------------------------------- commands (hub -> agent)


def command_batch_message(
    cluster: str, batch: bytes, trace: Mapping[str, str] | None = None
) -> tuple[str, bytes, dict[str, str]]:
    """A serialized DispatchBatch for `cluster`, as the (subject, payload, headers) publish_all takes.

    `trace`: the W3C context for the headers, its first command's (each command carries its own
    in the payload; the headers, for tools that read only them, can name one trace)."""
    return subject("cmd", cluster), batch, headers("DispatchBatch", trace=trace)


def command_consumer_config() -> ConsumerConfig:
    """An agent's command consumer: explicit acks, so a command counts only once the backend took
    it; redelivered without limit, since an edge agent may be away for days; and at most 10,000
    unacked, the flow control for a hub dispatching faster than the cluster creates workloads."""
    return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=-1, max_ack_pending=10_000)


def consume_commands(
    js: JetStream, cluster: str, stopping: Callable[[], bool], size: int = 1024
) -> AsyncGenerator[list[Message], None]:
    """Batches of `cluster`'s command messages from its durable consumer (see `consume`)."""
    return consume(
        js,
        subject("cmd", cluster),
        consumer_name(cluster),
        COMMANDS_STREAM,
        command_consumer_config(),
        size,
        stopping,
        replaces=legacy_consumer_name(cluster),
    )


def from_command_stream(msg: Message, cluster: str) -> bool:
    """Whether `msg` is a delivery of `cluster`'s commands from JetStream (its subject, and an ack
    reply of the commands stream), not something published straight to the agent's subjects."""
    return msg.subject == subject("cmd", cluster) and (msg.reply or "").startswith(
        f"$JS.ACK.{COMMANDS_STREAM}."
    )


def dispatch_commands_in(msg: Incoming) -> list[agent_pb.DispatchCommand]:
    """The commands a message carries: a DispatchBatch, or one DispatchCommand (earlier hubs)."""
    return _items_in(
        msg,
        "DispatchBatch",
        lambda data: agent_pb.DispatchBatch.FromString(data).commands,
        agent_pb.DispatchCommand.FromString,
    )


# ---------------------------------------------------------------------- status (agent -> hub)


async def publish_status_batch(
    js: JetStream,
    cluster: str,
    batch: bytes,
    ack_wait: float = 10.0,
    trace: Mapping[str, str] | None = None,
) -> None:
    """Publish a serialized StatusBatch; returns once JetStream has stored it, raises otherwise.

    `trace`: the W3C context for the headers, its first update's (as for commands)."""
    await js.publish(
        subject("status", cluster), batch, headers=headers("StatusBatch", trace=trace), timeout=ack_wait
    )


def status_consumer_config() -> ConsumerConfig:
    """The hub's status consumer: explicit acks, given after the etcd write, and at most 4,096
    unacked, so a hub slow to write holds the agents' updates in the stream, not in its memory."""
    return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=10, max_ack_pending=4096)


def consume_statuses(
    js: JetStream, stopping: Callable[[], bool], size: int = 2048
) -> AsyncGenerator[list[Message], None]:
    """Batches of every cluster's status messages from the hub's durable consumer (see `consume`)."""
    return consume(
        js,
        f"{PREFIX}.status.*",
        STATUS_CONSUMER,
        STATUS_STREAM,
        status_consumer_config(),
        size,
        stopping,
        replaces=LEGACY_STATUS_CONSUMER,
    )


def status_updates_in(msg: Incoming) -> list[agent_pb.StatusUpdate]:
    """The updates a message carries: a StatusBatch, or one StatusUpdate (earlier agents)."""
    return _items_in(
        msg,
        "StatusBatch",
        lambda data: agent_pb.StatusBatch.FromString(data).updates,
        agent_pb.StatusUpdate.FromString,
    )


class _Traced(Protocol):
    @property
    def trace_context(self) -> MutableMapping[str, str]: ...


_Item = TypeVar("_Item", bound=_Traced)


def _items_in(
    msg: Incoming,
    batch_type: str,
    batch: Callable[[bytes], Iterable[_Item]],
    single: Callable[[bytes], _Item],
) -> list[_Item]:
    """A batch message's items, or the one item of a message from a peer that does not batch
    (whose trace context, if it has none inside, travels in the headers).

    A message that does not parse has no items: it never will parse, so redelivering it would
    only hold up the good messages of every batch it lands in, for good. It is logged and
    settled like any message whose items all changed nothing.
    """
    try:
        if (msg.headers or {}).get(MSG_TYPE_HEADER) == batch_type:
            return list(batch(msg.data))
        item = single(msg.data)
    except DecodeError:
        log.warning("message dropped: it does not parse", expected=batch_type, bytes=len(msg.data))
        return []
    if not item.trace_context:
        item.trace_context.update(trace_headers(msg))
    return [item]


# ---------------------------------------------------------------------- acknowledgement


async def ack_or_nak(msgs: Sequence[Ackable], redeliver: Container[int], delay: float) -> None:
    """Settle a consumed batch at once: nak the messages whose index is in `redeliver`, so they
    come back after `delay` seconds, and ack the rest.

    Best effort: an ack lost on the way only means a redelivery after the consumer's ack_wait,
    which the receivers' idempotency makes harmless, so a failure here is not raised.
    """
    with contextlib.suppress(Exception):
        await asyncio.gather(
            *(msg.nak(delay=delay) if index in redeliver else msg.ack() for index, msg in enumerate(msgs)),
            return_exceptions=True,
        )


# ---------------------------------------------------------------------- requests (agent -> hub)


async def request(nc: Connection, kind: str, cluster: str, payload: bytes, within: float = 10.0) -> bytes:
    """Ask the hub on `<prefix>.<kind>.<cluster>` and return its answer; raises on timeout or when
    no hub listens, so the caller skips the round rather than act without an answer."""
    return (await nc.request(subject(kind, cluster), payload, timeout=within)).data


async def serve_requests(
    nc: Connection,
    kind: str,
    answer: Callable[[str, bytes], Awaitable[bytes]],
    queue: str = HUB_QUEUE,
) -> Subscription:
    """Answer every cluster's requests of one kind with `answer(cluster, payload)`, as one of a
    queue group; `cluster` is the subject's, the only name NATS permissions bind to the sender.

    Each request reaches one member of the group. A request `answer` fails on is logged and
    left unanswered: the requester times out and skips that round, which is safe for questions
    whose answer only ever leads to cleanup.
    """

    async def respond(msg: Message) -> None:
        try:
            await msg.respond(await answer(cluster_of(msg.subject), msg.data))
        except Exception:
            log.exception("request not answered", kind=kind, subject=msg.subject)

    return await nc.subscribe(f"{PREFIX}.{kind}.*", queue=queue, cb=respond)
