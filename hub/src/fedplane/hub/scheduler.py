"""Placement rounds: take the pending queue's pick, dispatch it by compare-and-swap, reserve
its capacity and queue its command.

Rounds are triggered by the table's wake event, not by polling. Batches form by themselves:
jobs submitted while a round writes its dispatches are placed together by the next one, so an
idle hub places a job at once and a busy one in large batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fedplane.core import dispatch as sm
from fedplane.core.model import JobRequest
from fedplane.core.placement import Decision, Weights
from fedplane.core.queues import QueueConfig
from fedplane.hub import records
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.commands import CommandQueue, create_command
from fedplane.hub.lost import DisconnectPolicies
from fedplane.hub.metrics import UNWIRED, HubMetrics, entered_pending
from fedplane.hub.preemptor import Preemptor
from fedplane.hub.store import FenceLost
from fedplane.hub.table import HOLDING, JobTable, StatusWrite
from fedplane.runtime import logs, telemetry
from fedplane.runtime.config import HubConfig
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S


class Scheduler:
    metrics: HubMetrics = UNWIRED

    def __init__(
        self,
        table: JobTable,
        registry: ClusterRegistry,
        commands: CommandQueue,
        clock: Clock,
        config: HubConfig,
        queues: Callable[[], QueueConfig] = QueueConfig,
    ) -> None:
        self.table = table
        self.registry = registry
        self.commands = commands
        self.clock = clock
        self.weights = Weights(**vars(config.weights))
        self.hub_id = config.hub_id
        self.max_per_round = config.max_dispatch_per_cycle
        self.batch_window = config.batch_window_seconds
        # Each create says when a cut-off agent must stop the job (its disconnect policy).
        self.policies = DisconnectPolicies(config)
        self.preemptor = Preemptor(
            table, registry, commands, clock, queues, config.preemption_interval_seconds
        )

    async def run(self) -> None:
        """Place as soon as something changed; what changes during a round waits for the next.

        `batch_window_seconds` adds a fixed wait before each round.
        """
        wake = self.table.wake
        while True:
            # Jobs backing off after a gang timeout join the queue when their time comes (table.due).
            next_due = self.table.due(self.clock.time())
            if next_due is None:
                await wake.wait()
            elif not wake.is_set():
                sleeper = asyncio.ensure_future(self.clock.sleep(next_due - self.clock.time()))
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                    woken.cancel()
                if not wake.is_set():
                    continue  # the next backoff is over: table.due queues it and wakes placement
            # At least one turn of the loop: submits finishing in this same turn join the batch.
            await asyncio.sleep(self.batch_window)
            wake.clear()
            try:
                await self.place_pending()
            except asyncio.CancelledError:
                raise
            except FenceLost:
                log.warning("placement stopped: this replica no longer leads")
                return
            except Exception:
                log.exception("placement cycle failed; retrying")
                await asyncio.sleep(1)
                self.table.capacity_changed()

    async def place_pending(self) -> None:
        """One round: place what fits, write the dispatches in one CAS batch, then act on what landed."""
        table = self.table
        queue = table.queue
        if not queue:
            return
        now = self.clock.time()
        round_start = int(now * 1e9)
        limit = self.max_per_round
        views = self.registry.views(now)
        with telemetry.tracer().start_as_current_span("hub.place_batch", attributes={"queued": len(queue)}):
            started = time.perf_counter()
            placed = queue.cycle(views, self.weights, limit)
            self.metrics.placement_cycle.observe(time.perf_counter() - started)
        if len(placed) >= limit:
            table.wake.set()  # more may fit: carry on right after this batch is written
        writes: list[StatusWrite] = []
        # The job, parsed once: its status to record the dispatch in, then its spec for the command.
        chosen: dict[str, tuple[JobRequest, Decision, pb.Job]] = {}
        jobs = table.jobs
        for admitted in placed:
            decision = admitted.decision
            verdict = decision.chosen
            assert verdict is not None and decision.cluster is not None
            record = jobs[decision.job_id]
            # The machine decides on the record's parsed fields and takes placement's verdict as
            # is; the job's own parsed copy records the move, so it is what is written.
            transition = sm.dispatch(record.dispatch_state, verdict)
            job = record.job
            records.record_into(job.status, transition, now)
            job.status.flavor = admitted.flavor
            writes.append(StatusWrite.of(decision.job_id, job.status, record.revision))
            chosen[decision.job_id] = (admitted.job, decision, job)
        if not writes:
            # Heads that wait for quota or room may preempt (rate-limited, see preemptor.py).
            await self.preemptor.round(lambda: views)
            return
        await self._write(writes, chosen, now, round_start)
        await self.preemptor.round(lambda: self.registry.views(self.clock.time()))

    async def _write(
        self,
        writes: list[StatusWrite],
        chosen: dict[str, tuple[JobRequest, Decision, pb.Job]],
        now: float,
        round_start: int,
    ) -> None:
        """Write the round's dispatches in one CAS batch, then reserve, command and log what landed."""
        waits: list[float] = []  # how long each job that landed waited (a metric)
        try:
            landed = await self.table.write(writes)
        except BaseException:
            # Refused (this replica no longer leads), failed, or cancelled as it stepped down:
            # the cycle took these jobs out of the queue, and nothing else puts a job that stays
            # PENDING back, so this replica would never place them when it leads again.
            for request, _, _ in chosen.values():
                self._unadmit(request)
            raise
        for write, written in zip(writes, landed, strict=True):
            request, decision, job = chosen[write.job_id]
            if written is None:
                self._unadmit(request)  # raced with another writer (a cancel)
                continue
            verdict = decision.chosen
            assert verdict is not None and decision.cluster is not None
            # The dispatch's log line names the job's trace, and in it the job's placement span
            # when there is one (else the submit's).
            trace_ids = telemetry.log_ids(job.trace_context)
            if telemetry.recording():
                # The job's own placement span, in its submit's trace: the round that decided it.
                span = telemetry.tracer().start_span(
                    "hub.place",
                    context=telemetry.extract(job.trace_context),
                    start_time=round_start,
                    attributes={
                        telemetry.JOB_ID: write.job_id,
                        telemetry.CLUSTER: decision.cluster,
                        "score": verdict.score.total,
                        "clusters.considered": len(decision.verdicts),
                    },
                )
                span.end()
                if trace_ids:
                    trace_ids["span_id"] = format(span.get_span_context().span_id, "016x")
            waits.append(max(0.0, now - entered_pending(job)))
            cluster = self.registry.clusters[decision.cluster]
            cluster.reserve(request, write.status.generation, verdict.assignments)
            fence = self.policies.fence_after_seconds(job.spec, self.registry, cluster)
            self.commands.queue(job, create_command(job, self.hub_id, fence))
            log.info(
                "job dispatched",
                job_id=write.job_id,
                cluster=decision.cluster,
                generation=write.status.generation,
                score=verdict.score.total,
                # The write's etcd revision: it tells a dispatch made before a takeover (below
                # the new leader's fencing revision) from one after.
                revision=written.revision,
                **trace_ids,
            )
        self.metrics.dispatches(waits)

    def _unadmit(self, request: JobRequest) -> None:
        """A job the cycle admitted but whose dispatch did not land: decide again if it still
        waits, and give back the quota it was admitted with unless it is on a cluster anyway."""
        current = self.table.jobs.get(request.id)
        if current is not None and current.state == S.PENDING:
            self.table.requeue(request)
        elif current is None or current.state not in HOLDING:
            self.table.queue.release(request.id)
