"""Status intake: the agents' StatusUpdate batches, applied with one CAS write per job, then acked.

A message is acked once every update in it is applied (or ignored as stale); a lost
compare-and-swap naks the messages involved, and the redelivered updates apply again
idempotently, by (generation, state).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

from opentelemetry import trace

from fedplane.core import dispatch as sm
from fedplane.hub import records
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.metrics import UNWIRED, HubMetrics
from fedplane.hub.store import FenceLost
from fedplane.hub.table import JobTable, StatusWrite
from fedplane.runtime import bus, logs, telemetry
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
# A job's status as a batch's updates have left it so far: what the state machine decides on,
# the wire status they were recorded in, and the revision the write compares.
_Pending = tuple[sm.DispatchState, pb.JobStatus, int]


class StatusMessage(bus.Incoming, bus.Ackable, Protocol):
    """What the intake reads and settles of a status message: nats-py's Msg, or a fake in tests."""

    @property
    def subject(self) -> str: ...


class StatusIntake:
    metrics: HubMetrics = UNWIRED

    def __init__(
        self,
        table: JobTable,
        registry: ClusterRegistry,
        clock: Clock,
        admitted: Callable[[str], bool] = lambda _cluster: True,
    ) -> None:
        self.table = table
        self.registry = registry
        self.clock = clock
        # Whether the hub acts on what a cluster sends (admission.ClusterAdmission.admitted).
        self.admitted = admitted

    async def run(self, js: bus.JetStream, stopping: Callable[[], bool]) -> None:
        async for msgs in bus.consume_statuses(js, stopping, 2048):
            try:
                await self.apply_batch(msgs)
            except asyncio.CancelledError:
                raise
            except FenceLost:
                log.warning("status intake stopped: this replica no longer leads")
                await bus.ack_or_nak(msgs, set(range(len(msgs))), delay=0)
                return
            except Exception:
                log.exception("applying status updates failed; they will be redelivered")
                await asyncio.sleep(0.5)

    def _take(self, update: agent_pb.StatusUpdate, now: float, pending: dict[str, _Pending]) -> bool:
        """Apply one update to the job's status as `pending` (the batch's writes so far) holds
        it; whether it changed the status."""
        found = pending.get(update.job_id)
        if found is None:
            record = self.table.jobs.get(update.job_id)
            if record is None:
                return False
            current, status, revision = record.dispatch_state, None, record.revision
        else:
            current, status, revision = found
        outcome = sm.apply_update(
            current,
            update.cluster,
            update.generation,
            update.state,
            reason=update.reason,
            message=update.message,
        )
        if isinstance(outcome, sm.Ignored):
            log.debug("status update ignored", job_id=update.job_id, cluster=update.cluster, why=outcome.why)
            return False
        if status is None:
            # Parsed once per job and batch, and only when an update applies; the batch owns
            # the copy, so later updates of the job are recorded into it in place.
            status = self.table.jobs[update.job_id].status
        records.record_into(status, outcome, now)
        pending[update.job_id] = (outcome.after, status, revision)
        log.debug(
            "job status",
            job_id=update.job_id,
            cluster=update.cluster,
            state=sm.state_name(update.state),
            reason=update.reason,
        )
        return True

    async def apply_batch(self, msgs: Sequence[StatusMessage]) -> None:
        """Apply the updates in a batch of messages with one etcd write per job, then ack or nak."""
        now = self.clock.time()
        self.metrics.status_messages(msgs)
        pending: dict[str, _Pending] = {}
        msgs_by_job: dict[str, set[int]] = {}
        # Without a span to make or a debug line to write, no per-update trace context is set up.
        traced = telemetry.recording() or logs.debug_enabled()
        for index, msg in enumerate(msgs):
            sender = bus.cluster_of(msg.subject)
            if not self.admitted(sender):
                # A removed cluster's live connection, or a message stored before its removal.
                log.warning("status batch dropped: its cluster is not admitted", cluster=sender[:80])
                continue
            for update in bus.status_updates_in(msg):
                if update.cluster != sender:
                    # A cluster may speak only for itself: what it says of another is dropped.
                    log.warning(
                        "status update dropped: it names another cluster than its subject",
                        cluster=sender,
                        claimed_cluster=update.cluster,
                        job_id=update.job_id,
                    )
                    continue
                with (
                    telemetry.child_span(
                        "hub.status",
                        update.trace_context,
                        kind=trace.SpanKind.CONSUMER,
                        attributes={
                            telemetry.JOB_ID: update.job_id,
                            telemetry.CLUSTER: update.cluster,
                            "state": sm.state_name(update.state),
                        },
                    )
                    if traced
                    else contextlib.nullcontext()
                ):
                    if self._take(update, now, pending):
                        msgs_by_job.setdefault(update.job_id, set()).add(index)
        writes = [
            StatusWrite.of(job_id, status, revision) for job_id, (_, status, revision) in pending.items()
        ]
        jobs = self.table.jobs
        # Where each job was before the batch: a fenced stop (back to PENDING) clears the cluster.
        held_at = {w.job_id: jobs[w.job_id].cluster for w in writes if w.job_id in jobs}
        freed = False
        lost: set[int] = set()
        applied: list[pb.JobStatus] = []
        for write, record in zip(writes, await self.table.write(writes), strict=True):
            if record is None:
                lost |= msgs_by_job[write.job_id]
                continue
            applied.append(write.status)
            written = write.status.state
            if sm.is_terminal(written) or written == sm.S.PENDING:
                state = self.registry.clusters.get(write.status.cluster or held_at.get(write.job_id, ""))
                if state is not None:
                    state.release(write.job_id, write.status.generation)
                freed = True
                if written == sm.S.PENDING:
                    log.warning(
                        "job fenced off by its agent; requeued",
                        job_id=write.job_id,
                        cluster=held_at.get(write.job_id, ""),
                        generation=write.status.generation,
                    )
        self.metrics.statuses(applied, now)
        await bus.ack_or_nak(msgs, lost, delay=0.1)
        if freed:
            self.table.capacity_changed()
