"""The read and administration API over the table and the cluster registry: get, list, stats,
cancel, explain, clusters, cordon and watch. Reads answer from memory; the writes are a cancel
(through the table's CAS path) and a cordon."""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from fedplane.core import dispatch as sm
from fedplane.core.placement import Decision, Weights, evaluate
from fedplane.core.queues import PriorityClass
from fedplane.hub import convert, records
from fedplane.hub.clock import Clock
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.commands import CommandQueue, delete_command
from fedplane.hub.errors import HubError
from fedplane.hub.events import Change, EventLog, WatchFellBehind
from fedplane.hub.store import NO_FENCE, RevisionCompacted
from fedplane.hub.table import JobRecord, JobTable, StatusWrite
from fedplane.hub.validation import refusal, validate_spec
from fedplane.runtime import logs, telemetry
from fedplane.v1 import hub_pb2 as hub_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S


@dataclass
class JobFilter:
    queue: str = ""
    states: frozenset[int] = frozenset()
    cluster: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # The queues the caller may read (None: every queue).
    readable: frozenset[str] | None = None

    def matches(self, record: JobRecord) -> bool:
        if self.queue and record.queue != self.queue:
            return False
        if self.readable is not None and record.queue not in self.readable:
            return False
        if self.states and record.state not in self.states:
            return False
        if self.cluster and record.cluster != self.cluster:
            return False
        if not self.labels:
            return True
        labels = record.spec_record.spec.labels
        return all(labels.get(k) == v for k, v in self.labels.items())


class HubApi:
    def __init__(
        self,
        table: JobTable,
        registry: ClusterRegistry,
        commands: CommandQueue,
        events: EventLog,
        clock: Clock,
        weights: Weights,
    ) -> None:
        self.table = table
        self.registry = registry
        self.commands = commands
        self.events = events
        self.clock = clock
        self.weights = weights

    # ------------------------------------------------------------------ jobs
    def get(self, job_id: str) -> pb.Job:
        record = self.table.jobs.get(job_id)
        if record is None:
            raise HubError("NOT_FOUND", f"job {job_id!r} not found")
        return self.table.job_out(record)

    def list_jobs(self, flt: JobFilter, page_size: int, page_token: str) -> tuple[list[pb.Job], str, int]:
        """A page of matching jobs in submission order.

        Jobs stored in one transaction share a revision, so the order (and the page token)
        is (submission revision, job id).
        """
        if page_size < 0:
            raise HubError("INVALID_ARGUMENT", "page_size: must not be negative")
        page_size = min(page_size or 100, 1000)
        after: tuple[int, str] = (0, "")
        if page_token:
            seq, _, job_id = page_token.partition(":")
            if not seq.isdigit() or not job_id:
                raise HubError("INVALID_ARGUMENT", f"page_token: {page_token!r} is not a token from ListJobs")
            after = (int(seq), job_id)
        revision = self.events.revision
        # One pass and a bounded heap: a page of a million jobs costs one scan, not a sort.
        matching = heapq.nsmallest(
            page_size + 1,
            (r for r in self.table.jobs.values() if (r.seq, r.id) > after and flt.matches(r)),
            key=lambda r: (r.seq, r.id),
        )
        page = matching[:page_size]
        next_token = f"{page[-1].seq}:{page[-1].id}" if len(matching) > page_size else ""
        return [self.table.job_out(r) for r in page], next_token, revision

    def job_stats(
        self, queue: str, readable: frozenset[str] | None = None
    ) -> tuple[dict[str, int], int, int]:
        """(jobs per state name, total, revision) from counters: cheap enough for clients to poll.
        Only the `readable` queues count (None: every queue)."""
        counts: dict[int, int] = {}
        for (job_queue, state), n in self.table.counts.items():
            if readable is not None and job_queue not in readable:
                continue
            if n and (not queue or job_queue == queue):
                counts[state] = counts.get(state, 0) + n
        by_state = {sm.state_name(state): n for state, n in counts.items()}
        return by_state, sum(counts.values()), self.events.revision

    async def cancel(self, job_id: str, reason: str) -> pb.Job:
        table = self.table
        for _ in range(10):
            record = table.jobs.get(job_id)
            if record is None:
                raise HubError("NOT_FOUND", f"job {job_id!r} not found")
            try:
                outcome = sm.request_cancel(record.dispatch_state, reason)
            except sm.TransitionError as exc:
                raise HubError("FAILED_PRECONDITION", f"job {job_id}: {exc}") from None
            if outcome.transition is None:
                written: JobRecord | None = record  # already cancelling: only the delete again
            else:
                status = records.record_into(record.status, outcome.transition, self.clock.time())
                # Any replica may write a user's cancel: the compare-and-swap on the job's own
                # status decides against a racing dispatch or update, whoever leads.
                write = StatusWrite.of(job_id, status, record.revision)
                (written,) = await table.write([write], NO_FENCE)
            if written is None:
                continue  # lost a race with a status update: re-read and decide again
            if outcome.send_delete:
                job = written.job
                self.commands.queue(job, delete_command(job, reason))
            else:
                table.wake.set()
            log.info(
                "job cancel requested",
                job_id=job_id,
                cluster=written.cluster,
                state=sm.state_name(written.state),
            )
            return table.job_out(written)
        raise HubError("ABORTED", f"job {job_id} kept changing; try again")

    async def set_priority(
        self, job_id: str, priority: int, priority_class: str, classes: Mapping[str, PriorityClass]
    ) -> pb.Job:
        """Change a waiting or running job's priority (by value, or to a class's value).

        Any replica may write it, as a cancel: the compare-and-swap on the job's status decides
        against a racing update. Waiting, the job takes its new place in its queue; running, it
        is judged by its new priority by the next preemption round."""
        if priority_class:
            found = classes.get(priority_class)
            if found is None:
                raise HubError(
                    "INVALID_ARGUMENT",
                    f"priority_class: {priority_class!r} does not exist (fedplane queues -o yaml)",
                )
            priority = found.value
        table = self.table
        for _ in range(10):
            record = table.jobs.get(job_id)
            if record is None:
                raise HubError("NOT_FOUND", f"job {job_id!r} not found")
            if sm.is_terminal(record.state):
                raise HubError(
                    "FAILED_PRECONDITION",
                    f"job {job_id} is {sm.state_name(record.state)}: its priority is final",
                )
            status = record.status
            status.priority = priority
            status.priority_class = priority_class
            (written,) = await table.write([StatusWrite.of(job_id, status, record.revision)], NO_FENCE)
            if written is None:
                continue  # lost a race with a status update: re-read and decide again
            log.info(
                "job priority changed",
                job_id=job_id,
                cluster=written.cluster,
                priority=priority,
                priority_class=priority_class,
                state=sm.state_name(written.state),
            )
            return table.job_out(written)
        raise HubError("ABORTED", f"job {job_id} kept changing; try again")

    def explain(self, job: pb.Job, seq: int | None = None) -> pb.Explanation:
        request = convert.job_request(job, seq if seq is not None else 1 << 62)
        verdicts = evaluate(request, self.registry.views(self.clock.time()), self.weights)
        out = pb.Explanation(job_id=job.id, verdicts=[convert.verdict_pb(v) for v in verdicts])
        status = job.status
        if status.state in sm.ON_CLUSTER or status.state in (S.SUCCEEDED, S.FAILED, S.CANCELLING):
            out.chosen_cluster = status.cluster
            out.summary = (
                f"{sm.state_name(status.state)} on {status.cluster} (generation {status.generation}); "
                f"verdicts below are for the clusters as they are now"
            )
            return out
        decision = Decision(
            job.id, verdicts[0].cluster if verdicts and verdicts[0].feasible else None, verdicts
        )
        out.chosen_cluster = decision.cluster or ""
        waiting = bool(job.id) and status.state == S.PENDING
        misfit = self.table.queue.misfit(job.id) if waiting else None
        if waiting:
            out.queue = job.spec.queue
            out.queue_position = self.table.queue.position(job.id) or 0
        if waiting and job.id in self.table.delayed:
            out.summary = self.table.backoff_reason(job.id)  # after a gang timeout (gangs.py)
        elif misfit is not None:
            out.summary = misfit.summary()
        else:
            out.summary = decision.summary()
            if not job.id and decision.cluster:
                out.summary = "would be " + out.summary
        return out

    def explain_job(self, job_id: str) -> pb.Explanation:
        record = self.table.jobs.get(job_id)
        if record is None:
            raise HubError("NOT_FOUND", f"job {job_id!r} not found")
        return self.explain(record.job, record.seq)

    def explain_spec(self, spec: pb.JobSpec) -> pb.Explanation:
        problems = validate_spec(spec)
        if problems:
            raise refusal(problems)
        return self.explain(pb.Job(spec=spec))

    # ------------------------------------------------------------------ clusters
    def clusters(self) -> list[pb.Cluster]:
        now = self.clock.time()
        active = self.table.active
        return [
            c.to_pb(now, self.registry.thresholds, active.get(c.name, 0))
            for c in sorted(self.registry.clusters.values(), key=lambda c: c.name)
        ]

    def cluster(self, name: str) -> pb.Cluster:
        for cluster in self.clusters():
            if cluster.name == name:
                return cluster
        raise HubError("NOT_FOUND", f"cluster {name!r} not found")

    async def set_cordon(self, name: str, cordoned: bool, reason: str) -> pb.Cluster:
        state = self.registry.clusters.get(name)
        if state is None:
            raise HubError("NOT_FOUND", f"cluster {name!r} not found")
        admin = pb.Cluster()
        admin.CopyFrom(state.admin)
        admin.cordoned = cordoned
        admin.cordon_reason = reason if cordoned else ""
        await self.table.store.put_cluster(name, admin.SerializeToString())
        state.admin = admin
        log.info("cluster cordon changed", cluster=name, cordoned=cordoned, reason=reason)
        self.table.capacity_changed()
        return self.cluster(name)

    # ------------------------------------------------------------------ watch
    async def watch(
        self,
        from_revision: int,
        queue: str = "",
        job_ids: Iterable[str] = (),
        readable: frozenset[str] | None = None,
    ) -> AsyncIterator[hub_pb.JobEvent]:
        """Job changes after `from_revision` (0: from now), from memory when recent enough, else etcd;
        only of jobs in the `readable` queues (None: every queue)."""
        ids = frozenset(job_ids)
        jobs = self.table.jobs

        def wanted(change: Change) -> bool:
            if ids and change.job_id not in ids:
                return False
            if readable is not None and change.queue not in readable:
                return False
            return not queue or change.queue == queue

        async def replay(after: int, until: int) -> AsyncIterator[Change]:
            async for revision, job_id, blob in self.table.store.watch_statuses(after):
                record = jobs.get(job_id)
                if record is not None:
                    yield Change(revision, job_id, record.queue, blob)
                if revision >= until:
                    return

        try:
            async for change in self.events.stream(from_revision, wanted, replay):
                event = self._event(change)
                if event is not None:
                    yield event
        except RevisionCompacted as exc:
            raise HubError(
                "OUT_OF_RANGE",
                f"from_revision {from_revision}: {exc}; list again and watch from its revision",
            ) from None
        except WatchFellBehind as exc:
            raise HubError("UNAVAILABLE", str(exc)) from None

    def _event(self, change: Change) -> hub_pb.JobEvent | None:
        record = self.table.jobs.get(change.job_id)
        if record is None:
            return None  # deleted since
        job = record.spec_record
        job.trace_id = telemetry.trace_id_of(job.trace_context)
        job.ClearField("trace_context")
        job.status.ParseFromString(change.status_blob)
        job.revision = change.revision
        if job.status.state == S.PENDING:
            job.pending_reason = self.table.pending_reason(job.id)
        return hub_pb.JobEvent(revision=change.revision, job=job)
