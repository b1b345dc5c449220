"""Dispatch commands on their way to the agents' durable consumers.

A command is queued once its dispatch record is in etcd and leaves the queue only when
JetStream has stored it; failed publishes are retried after a second. Commands travel in one
DispatchBatch message per cluster and round. A command sent twice (a retry, or a re-send after
a hub restart) is harmless: agents apply commands idempotently by (job, generation).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Protocol

from opentelemetry import trace

from fedplane.hub.metrics import UNWIRED, HubMetrics
from fedplane.runtime import bus, logs, telemetry
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")


def create_command(job: pb.Job, hub_id: str, fence_after_seconds: float = 0.0) -> agent_pb.DispatchCommand:
    """A create of the job's current dispatch. `fence_after_seconds`: how long the agent, cut
    off from the hub, keeps the workload before stopping it (lost.DisconnectPolicies gives it;
    0 keeps it however long)."""
    # Filled in place: building the parts as messages of their own copies the spec twice more.
    command = agent_pb.DispatchCommand(job_id=job.id, generation=job.status.generation)
    create = command.create
    create.spec.CopyFrom(job.spec)
    create.assignments.extend(job.status.assignments)
    create.hub_id = hub_id
    create.fence_after_seconds = fence_after_seconds
    return command


def delete_command(job: pb.Job, reason: str) -> agent_pb.DispatchCommand:
    """A delete of the job's dispatch at its status's generation, for the cluster in its status
    (the sender addresses a command to `job.status.cluster`)."""
    return agent_pb.DispatchCommand(
        job_id=job.id,
        generation=job.status.generation,
        delete=agent_pb.DeleteWorkload(reason=reason or "cancelled"),
    )


class CommandQueue(Protocol):
    """Where the drivers put commands: the sender, or a fake in tests."""

    def queue(self, job: pb.Job, command: agent_pb.DispatchCommand) -> None: ...


MAX_BATCH_BYTES = 512 * 1024
MAX_BATCH_COMMANDS = 2000
# (cluster, command, the job's trace context)
_Item = tuple[str, agent_pb.DispatchCommand, dict[str, str]]


class CommandSender:
    """Publishes queued commands in the background, a batch at a time, retrying failures.

    Placement never waits for JetStream: while one batch awaits its acks the next collects,
    so under load each batch is larger, not later. A command stays queued until stored.
    """

    metrics: HubMetrics = UNWIRED

    def __init__(self, js: bus.JetStream, batch: int = 10_000, retry_delay: float = 1.0) -> None:
        self.js = js
        self.batch = batch
        self.retry_delay = retry_delay
        self._unsent: dict[str, _Item] = {}
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._unsent) + self._in_flight

    def queue(self, job: pb.Job, command: agent_pb.DispatchCommand) -> None:
        """Queue a command for the job's cluster, under the job's trace (the command carries the
        job's context unless a span of its own replaces it when published)."""
        key = f"{command.job_id}:{command.generation}:{command.WhichOneof('action') or ''}"
        context = job.trace_context
        command.trace_context.update(context)
        self._unsent[key] = (job.status.cluster, command, dict(context))
        self._idle.clear()
        self._wake.set()

    async def sent(self) -> None:
        """Wait until nothing is queued or in flight (for callers that must know it left)."""
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            items = list(itertools.islice(self._unsent.items(), self.batch))
            for key, _ in items:
                del self._unsent[key]
            self._in_flight = len(items)
            try:
                failed = await self._publish(items)
            except Exception as exc:
                log.warning("command publish failed; will retry", error=str(exc))
                failed = items
            self._in_flight = 0
            for key, item in failed:
                self._unsent.setdefault(key, item)
            if failed:
                await asyncio.sleep(self.retry_delay)
            if self._unsent:
                self._wake.set()
            else:
                self._idle.set()

    async def _publish(self, items: list[tuple[str, _Item]]) -> list[tuple[str, _Item]]:
        """Publish a round of commands as one DispatchBatch per cluster; the items not stored."""
        recording = telemetry.recording()
        spans = []
        by_cluster: dict[str, list[tuple[str, _Item]]] = {}
        for key, item in items:
            cluster, command, ctx = item
            if recording:
                span = telemetry.tracer().start_span(
                    f"hub.dispatch.{command.WhichOneof('action')}",
                    context=telemetry.extract(ctx),
                    kind=trace.SpanKind.PRODUCER,
                    attributes={
                        telemetry.JOB_ID: command.job_id,
                        telemetry.CLUSTER: cluster,
                        "generation": command.generation,
                    },
                )
                spans.append(span)
                command.trace_context.clear()
                command.trace_context.update(telemetry.inject_span(span))
            by_cluster.setdefault(cluster, []).append((key, item))
        chunks: list[list[tuple[str, _Item]]] = []
        messages = []
        for cluster, entries in by_cluster.items():
            for chunk in _chunks(entries):
                batch = agent_pb.DispatchBatch(commands=[command for _, (_, command, _) in chunk])
                chunks.append(chunk)
                first = batch.commands[0].trace_context
                messages.append(bus.command_batch_message(cluster, batch.SerializeToString(), first))
        started = time.perf_counter()
        results = await bus.publish_all(self.js, messages)
        self.metrics.command_round(time.perf_counter() - started, sum(1 for e in results if e is not None))
        failed = [
            entry
            for chunk, error in zip(chunks, results, strict=True)
            if error is not None
            for entry in chunk
        ]
        failed_keys = {key for key, _ in failed}
        for (key, _), span in zip(items, spans, strict=False):
            if key in failed_keys:
                span.set_status(trace.Status(trace.StatusCode.ERROR, "not stored by JetStream"))
            span.end()
        if failed:
            error = next(e for e in results if e is not None)
            log.warning("command publish failed; will retry", failed=len(failed), error=str(error))
        return failed


def _chunks(entries: list[tuple[str, _Item]]) -> Iterator[list[tuple[str, _Item]]]:
    """Split a cluster's commands into messages well under NATS's default 1 MiB payload limit."""
    chunk: list[tuple[str, _Item]] = []
    size = 0
    for entry in entries:
        command_size = entry[1][1].ByteSize()
        if chunk and (size + command_size > MAX_BATCH_BYTES or len(chunk) >= MAX_BATCH_COMMANDS):
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += command_size + 8
    if chunk:
        yield chunk
