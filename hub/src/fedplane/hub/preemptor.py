"""Preemption rounds (leader only): for each waiting queue head that its quota or the clusters
cannot take, ask the core whom to evict (`Queues.preempt`, one cluster, the fewest and lowest),
then evict them: a fenced compare-and-swap back to PENDING (or FAILED, when the job asks), the
capacity released, a delete to the old cluster, and a line of history saying who preempted it.

Evictions per queue are rate-limited (`Preemption.max_per_minute`), so that fair sharing does
not thrash; a round runs at most once per `preemption_interval_seconds` and only when a head
waits, so a federation with nothing to preempt pays nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from fedplane.core import dispatch as sm
from fedplane.core import preemption
from fedplane.core.model import ClusterView
from fedplane.core.queues import QueueConfig
from fedplane.hub import convert, records
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.commands import CommandQueue, delete_command
from fedplane.hub.table import HOLDING, JobRecord, JobTable, StatusWrite
from fedplane.runtime import logs, telemetry
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S
PREEMPTED = "Preempted"
# Heads considered per round: each plan costs a pass over its clusters' running jobs.
MAX_CANDIDATES = 8
# A head that found no plan is not tried again for this long unless the running jobs change.
NO_PLAN_MEMORY_SECONDS = 30.0


class RateLimit:
    """A token bucket per queue: `per_minute` evictions, refilled continuously (0: no limit)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}

    def allowance(self, queue: str, per_minute: float) -> int:
        if per_minute <= 0:
            return 1_000_000
        tokens, since = self._tokens.get(queue, (per_minute, self.clock()))
        now = self.clock()
        tokens = min(per_minute, tokens + (now - since) * per_minute / 60.0)
        self._tokens[queue] = (tokens, now)
        return int(tokens)

    def spend(self, queue: str, count: int) -> None:
        tokens, since = self._tokens.get(queue, (0.0, self.clock()))
        self._tokens[queue] = (max(0.0, tokens - count), since)


class Preemptor:
    def __init__(
        self,
        table: JobTable,
        registry: ClusterRegistry,
        commands: CommandQueue,
        clock: Clock,
        config: Callable[[], QueueConfig],
        interval: float = 1.0,
    ) -> None:
        self.table = table
        self.registry = registry
        self.commands = commands
        self.clock = clock
        self.config = config
        self.interval = interval
        self.limits = RateLimit(clock.time)
        self._last = -float("inf")
        self._retry = False
        self._index: preemption.RunningIndex | None = None
        # What the last round saw (see round()), and the heads it found no plan for.
        self._situation: tuple[int, int, int] = (0, 0, 0)
        self._no_plan: set[str] = set()
        self._since = 0.0
        # The sum of the running jobs' status revisions: changes with any of their statuses.
        self._revisions = 0
        # job id -> (the record's revision, the job as preemption sees it)
        self._running: dict[str, tuple[int, preemption.RunningJob]] = {}

    async def round(self, views_now: Callable[[], Sequence[ClusterView]]) -> int:
        """One preemption round, unless one ran within the interval; how many jobs it evicted."""
        now = self.clock.time()
        queues = self.table.queue
        wait = self._last + self.interval - now
        if wait > 0:
            if not self._retry and queues.blocked_heads():
                # Look again once the interval is over, even if nothing else wakes placement.
                self._retry = True
                asyncio.get_running_loop().call_later(wait, self._again)
            return 0
        heads = queues.blocked_heads()[:MAX_CANDIDATES]
        if not heads:
            return 0
        self._last = now
        views = views_now()
        config = self.config()
        running = self._running_jobs(config)
        index = self._index = preemption.RunningIndex(running, self._index)
        # Heads that found no plan wait until the jobs on clusters or the configuration change
        # (or a while: minimum run times run out on their own).
        situation = (len(running), self._revisions, id(config))
        if situation != self._situation or now - self._since > NO_PLAN_MEMORY_SECONDS:
            self._situation, self._no_plan, self._since = situation, set(), now
        evicted = 0
        taken: set[str] = set()
        for head in heads:
            if head.id in self._no_plan:
                continue
            spec = config.queues[head.queue]
            pclass = config.priority_classes.get(self._priority_class(head.id))
            budget = self.limits.allowance(head.queue, spec.preemption.max_per_minute)
            if budget <= 0:
                self._last = now - self.interval + 60.0 / max(spec.preemption.max_per_minute, 1e-9)
                continue
            plan = queues.preempt(
                head,
                views,
                index,
                now,
                may_preempt=pclass is None or pclass.may_preempt,
                interruptible=pclass is not None and pclass.interruptible,
                budget=budget,
            )
            if plan is None:
                self._no_plan.add(head.id)
                continue
            if any(e.job_id in taken for e in plan.evictions):
                continue
            taken.update(e.job_id for e in plan.evictions)
            done = await self._evict(plan, head.id, now)
            self.limits.spend(head.queue, done)
            evicted += done
        if evicted:
            self.table.capacity_changed()
        return evicted

    def _again(self) -> None:
        self._retry = False
        self.table.wake.set()

    def _priority_class(self, job_id: str) -> str:
        record = self.table.jobs.get(job_id)
        return priority_class_of(record.job) if record is not None else ""

    def _running_jobs(self, config: QueueConfig) -> list[preemption.RunningJob]:
        """Every job holding capacity, as preemption sees it; parsed once per status change."""
        running: list[preemption.RunningJob] = []
        fresh: dict[str, tuple[int, preemption.RunningJob]] = {}
        revisions = 0
        for record in self.table.jobs.values():
            if record.state not in HOLDING or not record.cluster or record.state == S.CANCELLING:
                continue
            cached = self._running.get(record.id)
            if cached is None or cached[0] != record.revision:
                cached = (record.revision, _running_job(record, config))
            fresh[record.id] = cached
            running.append(cached[1])
            revisions += record.revision
        self._running = fresh
        self._revisions = revisions
        return running

    async def _evict(self, plan: preemption.Plan, preemptor: str, now: float) -> int:
        writes: list[StatusWrite] = []
        acting: list[tuple[preemption.Eviction, pb.Job]] = []
        for eviction in plan.evictions:
            record = self.table.jobs.get(eviction.job_id)
            if record is None or record.state not in sm.ON_CLUSTER:
                continue
            job = record.job  # as it is on its cluster: the delete goes there, for that copy
            message = eviction.message()
            if job.spec.fail_on_preemption:
                transition = sm.give_up(record.dispatch_state, PREEMPTED, message)
            else:
                transition = sm.requeue(record.dispatch_state, PREEMPTED, message=message)
            status = records.record(job.status, transition, now)
            writes.append(StatusWrite.of(record.id, status, record.revision))
            acting.append((eviction, job))
        if not writes:
            return 0
        done = 0
        for (eviction, job), written in zip(acting, await self.table.write(writes), strict=True):
            if written is None:
                continue  # it finished or moved meanwhile: nothing to evict
            done += 1
            state = self.registry.clusters.get(eviction.cluster)
            if state is not None:
                state.release(job.id, job.status.generation)
            self.commands.queue(job, delete_command(job, f"{PREEMPTED}: {eviction.message()}"))
            log.info(
                "job preempted",
                job_id=job.id,
                cluster=eviction.cluster,
                generation=job.status.generation,
                reason=eviction.reason.name,
                preemptor=preemptor,
                state=sm.state_name(written.state),
                **telemetry.log_ids(job.trace_context),
            )
        return done


def _running_job(record: JobRecord, config: QueueConfig) -> preemption.RunningJob:
    job = record.job
    spec, status = job.spec, job.status
    started = status.start_time if status.HasField("start_time") else status.update_time
    pclass = config.priority_classes.get(priority_class_of(job))
    return preemption.RunningJob(
        job_id=record.id,
        queue=record.queue,
        cluster=record.cluster,
        priority=status.priority if status.HasField("priority") else spec.priority,
        seq=record.seq,
        assignments=tuple(convert.assignments_core(status.assignments)),
        requests={p.name: dict(p.requests.quantities) for p in spec.pod_sets},
        started_at=started.seconds + started.nanos / 1e9,
        min_run_seconds=float(spec.min_run_seconds),
        interruptible=pclass is not None and pclass.interruptible,
    )


def priority_class_of(job: pb.Job) -> str:
    """The job's priority class: the one it was changed to, else its spec's."""
    status = job.status
    return status.priority_class if status.HasField("priority") else job.spec.priority_class
