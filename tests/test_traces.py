"""Traces in a real backend: one trace follows a job across the client, the hub and the agent
(separate processes, exporting OTLP to Jaeger v2), read back through Jaeger's query API; the
trace context rides in the NATS headers as well as in the payload; the log lines about the job
name its trace and span; and a watch stream is traced without upstream's context errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import yaml
from nats.aio.msg import Msg
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fedplane.client.sdk import FedplaneClient
from fedplane.local import servers as embedded
from fedplane.local.jaeger import Jaeger, Span, start_jaeger
from fedplane.runtime import bus, telemetry
from fedplane.v1 import types_pb2 as pb
from tests.federation import Federation, eventually, job_spec

CLUSTER = "c1"


@dataclass
class Stack:
    jaeger: Jaeger
    nats: embedded.ServerProcess
    hub: embedded.ServerProcess
    agent: embedded.ServerProcess


def _daemon(kind: str, settings: dict[str, Any], tmp_path: Path, port: int) -> embedded.ServerProcess:
    """`python -m fedplane.<kind> --config F`, as an operator runs it, logging to <kind>.log."""
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(settings))
    log = tmp_path / f"{kind}.log"
    # Spans leave every 100 ms rather than every 5 s (the SDK's default), for a short test.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDPLANE_", "OTEL_"))}
    env |= {"OTEL_BSP_SCHEDULE_DELAY": "100", "PYTHONUNBUFFERED": "1"}
    process = embedded.spawn_logged(
        [sys.executable, "-m", f"fedplane.{kind}", "--config", str(path)], log, env
    )
    return embedded.ServerProcess(kind, process, "127.0.0.1", port, tmp_path, log)


@pytest.fixture
def stack(tmp_path: Path) -> Any:
    """etcd, nats-server and Jaeger, a hub and an agent as processes of their own, all on loopback.

    NATS runs without authentication here, so that the test can read the messages on it."""
    started: list[Any] = []
    try:
        jaeger = start_jaeger(tmp_path / "jaeger", max_traces=1000)
        started.append(jaeger)
        etcd = embedded.start_etcd(tmp_path / "etcd")
        started.append(etcd)
        nats_server = embedded.start_nats(tmp_path / "nats")
        started.append(nats_server)
        traces = {
            "exporter": "otlp",
            "endpoint": jaeger.otlp_endpoint,
            "log_format": "json",
            "log_level": "info",
        }
        port = embedded.free_port()
        hub = _daemon(
            "hub",
            {
                "listen": f"127.0.0.1:{port}",
                "insecure": True,
                "implicit_queues": True,
                "etcd_endpoint": etcd.address,
                "nats_url": f"nats://{nats_server.address}",
                "batch_window_seconds": 0.01,
                "telemetry": traces,
            },
            tmp_path,
            port,
        )
        started.append(hub)
        agent = _daemon(
            "agent",
            {
                "cluster": CLUSTER,
                "insecure": True,
                "nats_url": f"nats://{nats_server.address}",
                "heartbeat_interval_seconds": 0.3,
                "state_dir": str(tmp_path / "agent-state"),
                "backend": {
                    "type": "simulated",
                    "start_delay_seconds": 0.05,
                    "nodes": [{"name": "n", "count": 1, "resources": {"cpu": 8, "memory": "32Gi"}}],
                },
                "telemetry": traces,
            },
            tmp_path,
            0,
        )
        started.append(agent)
        yield Stack(jaeger, nats_server, hub, agent)
    finally:
        for server in reversed(started):
            server.stop()


def _listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process `pid` listens on, from /proc."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # Each 32-bit word of the address is written in the host's (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def _job_items(msgs: list[Msg], job_id: str) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(headers, the item's own trace context) of every command or status item about the job."""
    found = []
    for msg in msgs:
        items: list[Any] = (
            bus.dispatch_commands_in(msg) if ".cmd." in msg.subject else bus.status_updates_in(msg)
        )
        for item in items:
            if item.job_id == job_id:
                found.append((dict(msg.headers or {}), dict(item.trace_context)))
    return found


def _log_lines(path: Path, event: str, job_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event and line.get("job_id") == job_id]


@pytest.mark.e2e
async def test_one_trace_in_jaeger_follows_a_job_across_client_hub_and_agent(stack: Stack) -> None:
    jaeger = stack.jaeger
    # Every port Jaeger opens is on loopback, and only the three this module configures.
    assert _listening(jaeger.server.process.pid) == {
        ("127.0.0.1", jaeger.otlp_port),
        ("127.0.0.1", jaeger.query_port),
        ("127.0.0.1", jaeger.query_grpc_port),
    }

    # What goes over NATS, read as any tool that subscribes to the subjects would.
    tap = await nats.connect(f"nats://{stack.nats.address}")
    seen: list[Msg] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg)

    await tap.subscribe(f"{bus.PREFIX}.cmd.*", cb=keep)
    await tap.subscribe(f"{bus.PREFIX}.status.*", cb=keep)

    # The client traces its own calls, exporting to the same Jaeger.
    provider = telemetry.make_provider("fedplane-client", "otlp", jaeger.otlp_endpoint)
    target = f"127.0.0.1:{stack.hub.port}"
    try:
        async with FedplaneClient(
            target, interceptors=telemetry.grpc_client_interceptors(provider)
        ) as client:

            async def ready() -> bool:
                try:
                    return any(c.name == CLUSTER and c.health == pb.READY for c in await client.clusters())
                except Exception:
                    return False

            await eventually(ready, 20, f"cluster {CLUSTER} ready")
            job, _ = await client.submit(job_spec("traced", duration="0.2s"))
            async with asyncio.timeout(15):
                done = (await client.wait([job.id]))[job.id]
            assert done.status.state == pb.SUCCEEDED
            trace_id = job.trace_id
            assert len(trace_id) == 32 and (await client.get(job.id)).trace_id == trace_id
        await asyncio.to_thread(provider.force_flush)
    finally:
        provider.shutdown()
        await tap.close()

    wanted = {"/fedplane.v1.JobService/SubmitJob", "hub.place", "hub.dispatch.create", "agent.create"}
    spans: list[Span] = []

    async def complete() -> bool:
        nonlocal spans
        spans = await asyncio.to_thread(jaeger.spans, trace_id)
        finals = [s for s in spans if s.name == "hub.status" and s.attributes.get("state") == "SUCCEEDED"]
        # Each process exports on its own: a child may be in before its parent.
        linked = {s.parent_id for s in spans if s.parent_id} <= {s.span_id for s in spans}
        return wanted <= {s.name for s in spans} and bool(finals) and linked

    # One trace, and in it every span's parent (across processes); one root, the client's call.
    await eventually(complete, 10, "the job's spans in Jaeger, each with its parent")
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_id]
    assert [(r.name, r.service) for r in roots] == [("/fedplane.v1.JobService/SubmitJob", "fedplane-client")]

    def parent(span: Span) -> Span:
        return by_id[span.parent_id]

    def one(name: str, service: str) -> Span:
        (found,) = [s for s in spans if s.name == name and s.service == service]
        return found

    hub_service, agent_service = "fedplane-hub", f"fedplane-agent-{CLUSTER}"
    served = one("/fedplane.v1.JobService/SubmitJob", hub_service)
    assert parent(served) == roots[0]  # client -> hub, across processes
    placed, dispatched = one("hub.place", hub_service), one("hub.dispatch.create", hub_service)
    assert parent(placed) == served and parent(dispatched) == served
    created = one("agent.create", agent_service)
    assert parent(created) == dispatched  # hub -> agent, across processes, over NATS
    reports = [s for s in spans if s.name == "agent.status"]
    assert {s.attributes["state"] for s in reports} >= {"RUNNING", "SUCCEEDED"}
    assert all(s.service == agent_service and parent(s) == created for s in reports)
    applied = [s for s in spans if s.name == "hub.status"]
    assert applied and all(s.service == hub_service and parent(s) in reports for s in applied)
    for span in (placed, dispatched, created, *reports, *applied):
        assert span.attributes[telemetry.JOB_ID] == job.id and span.attributes[telemetry.CLUSTER] == CLUSTER

    # On NATS: the item's own context in the payload, and the same in the message's headers.
    commands = _job_items([m for m in seen if ".cmd." in m.subject], job.id)
    updates = _job_items([m for m in seen if ".status." in m.subject], job.id)
    assert commands and len(updates) >= 2
    for headers, own in commands + updates:
        assert telemetry.trace_id_of(own) == trace_id
        assert headers["traceparent"] == own["traceparent"]
    assert telemetry.ids_of(commands[0][1])[1] == dispatched.span_id
    assert {telemetry.ids_of(own)[1] for _, own in updates} <= {s.span_id for s in reports}

    # The log lines about the job name it, its cluster, its trace and their span in it.
    (line,) = _log_lines(stack.hub.log_path, "job dispatched", job.id)
    assert (line["cluster"], line["trace_id"], line["span_id"]) == (CLUSTER, trace_id, placed.span_id)
    (line,) = _log_lines(stack.agent.log_path, "workload created", job.id)
    assert (line["cluster"], line["trace_id"], line["span_id"]) == (CLUSTER, trace_id, created.span_id)


@pytest.fixture
async def watching(federation: Federation) -> AsyncIterator[FedplaneClient]:
    async with federation.client() as client:
        yield client


async def test_a_watch_closed_early_is_one_span_without_context_errors(
    federation: Federation,
    watching: FedplaneClient,
    span_exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    span_exporter.clear()
    caplog.set_level(logging.WARNING)
    with telemetry.tracer().start_as_current_span("test.watch") as caller:
        events = watching.watch()
        first = asyncio.create_task(anext(events))
        await asyncio.sleep(0.3)  # the watch is open before the job exists
        job, _ = await watching.submit(job_spec("watched"))  # no cluster: it stays pending
        event = await asyncio.wait_for(first, 10)
        assert event.job.id == job.id and event.job.trace_id == job.trace_id
    await events.aclose()  # closed early: the hub sees the client cancel the stream

    def watch_spans() -> list[Any]:
        return [s for s in span_exporter.get_finished_spans() if s.name.endswith("/WatchJobs")]

    async def ended() -> bool:
        return bool(watch_spans())

    await eventually(ended, 5, "the watch's span to end")
    (span,) = watch_spans()
    assert span.parent is not None and span.parent.span_id == caller.get_span_context().span_id
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == 1  # CANCELLED
    assert span.attributes["fedplane.watch.messages"] >= 1
    await asyncio.sleep(0.2)  # a detach error would be logged as the stream is finalized
    problems = [r for r in caplog.records if "detach" in r.getMessage().lower()]
    assert not problems, problems


@dataclass(frozen=True)
class _Call:
    """What grpc.aio hands a server interceptor about a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _ServicerContext:
    """The part of a grpc.aio servicer context the tracing reads."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None


async def test_a_watch_the_event_loop_finalizes_elsewhere_logs_no_context_error(
    span_exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream grpc.aio drops while it is suspended at a message (its client went away as it was
    sent) is closed by the event loop's async-generator finalizer, in a task of its own: the
    upstream interceptor then logs "Failed to detach context" (opentelemetry-python-contrib#2357).
    Done here deterministically: one task takes a message, another closes the stream."""
    span_exporter.clear()
    caplog.set_level(logging.WARNING)

    async def events(request: object, context: object) -> AsyncIterator[int]:
        for n in range(1000):
            yield n
            await asyncio.sleep(0)

    async def continuation(call: object) -> grpc.RpcMethodHandler:
        return grpc.unary_stream_rpc_method_handler(events)

    method = "/fedplane.v1.JobService/WatchJobs"
    handler = await telemetry.grpc_server_interceptor().intercept_service(continuation, _Call(method))
    stream = handler.unary_stream(None, _ServicerContext())
    assert await asyncio.create_task(anext(stream)) == 0
    await asyncio.create_task(stream.aclose())
    (span,) = [s for s in span_exporter.get_finished_spans() if s.name == method]
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == 1 and span.attributes["fedplane.watch.messages"] == 1
    problems = [r for r in caplog.records if "detach" in r.getMessage().lower()]
    assert not problems, problems
