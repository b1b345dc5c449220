"""The hub: durable job intake, event-driven placement, dispatch and status, around the pure core.

Everything that decides lives in fedplane.core; this module moves data between etcd, NATS,
the core and the API. The job table merges two sources monotonically by etcd revision:
the hub's own compare-and-swap writes (so it sees them at once) and its own watch on the
status keys (so that every change up to the watch's revision is in the table). That watch
also feeds the resumable event stream that clients watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace

from fedplane.core import dispatch as sm
from fedplane.core.model import JobRequest
from fedplane.core.pending import PendingQueue
from fedplane.core.placement import Decision, Weights, evaluate
from fedplane.core.validation import validate_spec
from fedplane.hub import convert
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.commands import CommandSender, create_command, delete_command
from fedplane.hub.events import Change, EventLog, WatchFellBehind
from fedplane.hub.store import JobRecord, NewJob, RevisionCompacted, StatusWrite, Store
from fedplane.runtime import bus, logs, tasks, telemetry, timestamps
from fedplane.runtime.config import HubConfig
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import hub_pb2 as hub_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = sm.S
MAX_IDEMPOTENCY_KEY = 256
EVENT_BUFFER = 20_000
# States in which a job holds (or is about to hold) capacity in its cluster.
_HOLDING = sm.ON_CLUSTER | {S.CANCELLING}


class HubError(Exception):
    """An API-level refusal; `code` names the gRPC status the service maps it to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def new_job_id() -> str:
    """Time-ordered, DNS-label-safe job id."""
    return f"j{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


@dataclass
class JobFilter:
    queue: str = ""
    states: frozenset[int] = frozenset()
    cluster: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def matches(self, record: JobRecord) -> bool:
        if self.queue and record.queue != self.queue:
            return False
        if self.states and record.state not in self.states:
            return False
        if self.cluster and record.cluster != self.cluster:
            return False
        if not self.labels:
            return True
        labels = record.spec_record.spec.labels
        return all(labels.get(k) == v for k, v in self.labels.items())


class Hub:
    def __init__(self, config: HubConfig, store: Store, nc: NATS, js: JetStreamContext) -> None:
        self.config = config
        self.store = store
        self.nc = nc
        self.js = js
        self.weights = Weights(**vars(config.weights))
        self.jobs: dict[str, JobRecord] = {}
        # Jobs waiting for a cluster, by shape: what each placement cycle works on.
        self.queue = PendingQueue()
        # Jobs per (queue, state) and active jobs per cluster, kept as statuses change.
        self.counts: Counter[tuple[str, int]] = Counter()
        self.active: Counter[str] = Counter()
        self.registry = ClusterRegistry(config.heartbeat_timeout_seconds)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self.events = EventLog(EVENT_BUFFER)
        self.commands = CommandSender(js)
        self._ready_clusters: frozenset[str] = frozenset()
        self._stopping = False
        # Submits waiting for the next etcd transaction (see _store), and those in it by job id.
        self._intake: list[tuple[list[NewJob], asyncio.Future[list[tuple[JobRecord, bool]]]]] = []
        self._creating: dict[str, NewJob] = {}
        self._intake_ready = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def start(cls, config: HubConfig) -> Hub:
        store = await Store.connect(
            config.etcd_endpoint, config.etcd_prefix, max_txn_ops=config.etcd_max_txn_ops
        )
        nc = await bus.connect(config.nats_url, f"fedplane-hub-{config.hub_id}")
        js = nc.jetstream()
        await bus.ensure_streams(js, config.stream_max_age_seconds)
        hub = cls(config, store, nc, js)
        await hub._recover()
        return hub

    async def _recover(self) -> None:
        """Load every job and cluster, then resume: watch, consume, and re-send what may be unsent."""
        records, revision = await self.store.load_jobs()
        self.events.revision = revision
        for name, admin in (await self.store.load_clusters()).items():
            state, _ = self.registry.get_or_add(name)
            state.admin = admin
        for record in records:
            self._add(record)
            if record.state in sm.ON_CLUSTER and record.cluster:
                # Hold the capacity until the cluster's inventory confirms it.
                job = record.job
                state, _ = self.registry.get_or_add(record.cluster)
                state.reserve(
                    convert.job_request(job, record.seq),
                    record.generation,
                    convert.assignments_core(job.status.assignments),
                )
            if record.state == S.DISPATCHED:
                job = record.job
                self.commands.queue(job, create_command(job, self.config.hub_id))
            elif record.state == S.CANCELLING:
                job = record.job
                self.commands.queue(job, delete_command(job, job.status.message))
        log.info(
            "hub recovered",
            jobs=len(records),
            pending=len(self.queue),
            revision=revision,
            resend=len(self.commands),
        )
        self._tasks = [
            asyncio.create_task(self._intake_loop(), name="hub-intake"),
            asyncio.create_task(self._watch_own_statuses(), name="hub-watch"),
            asyncio.create_task(self._schedule_loop(), name="hub-schedule"),
            asyncio.create_task(self._consume_status(), name="hub-status"),
            asyncio.create_task(self._health_loop(), name="hub-health"),
            asyncio.create_task(self.commands.run(), name="hub-commands"),
            asyncio.create_task(self._retention_loop(), name="hub-retention"),
        ]
        await self._subscribe_reports()
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self.events.close()
        # Let the status consumer finish its batch, so no fetched update waits out its ack deadline.
        await tasks.finish_first(next((t for t in self._tasks if t.get_name() == "hub-status"), None), 3)
        # Commands not yet stored would be re-sent after a restart anyway; this only saves the wait.
        await tasks.bounded(self.commands.sent(), 2, "command publish")
        await tasks.cancel_all(self._tasks)
        for _, future in self._intake:
            if not future.done():
                future.set_exception(HubError("UNAVAILABLE", "the hub is shutting down; submit again"))
        for sub in self._subs:
            await tasks.bounded(sub.unsubscribe(), 2, "unsubscribe")
        await tasks.bounded(self.nc.close(), 5, "NATS close")
        await tasks.bounded(self.store.close(), 5, "etcd close")

    # ------------------------------------------------------------------ job table
    def _add(self, record: JobRecord, request: JobRequest | None = None) -> JobRecord:
        """Hold a job (once): count it, and queue it when it waits for a cluster."""
        held = self.jobs.get(record.id)
        if held is not None:
            return held
        self.jobs[record.id] = record
        self._count(record, 1)
        if record.state == S.PENDING:
            self.queue.add(request or convert.job_request(record.spec_record, record.seq))
        return record

    def _forget(self, record: JobRecord) -> None:
        if self.jobs.pop(record.id, None) is not None:
            self._count(record, -1)
            self.queue.discard(record.id)

    def _count(self, record: JobRecord, delta: int) -> None:
        self.counts[(record.queue, record.state)] += delta
        if record.cluster and record.state in _HOLDING:
            self.active[record.cluster] += delta

    def _merge(
        self, job_id: str, status: pb.JobStatus, revision: int, blob: bytes | None = None
    ) -> JobRecord | None:
        """Apply a status at `revision` unless the table already holds a newer one."""
        record = self.jobs.get(job_id)
        if record is None:
            return None
        if revision > record.revision:
            self._count(record, -1)
            was_pending = record.state == S.PENDING
            record.set_status(status, revision, blob)
            self._count(record, 1)
            if was_pending and record.state != S.PENDING:
                self.queue.discard(job_id)
        return record

    def _job_out(self, record: JobRecord, job: pb.Job | None = None) -> pb.Job:
        """The job as the API shows it; `job` is the record's job when the caller holds it parsed."""
        job = job if job is not None else record.job
        job.revision = record.revision
        job.ClearField("trace_context")
        if job.status.state == S.PENDING:
            job.pending_reason = self._pending_reason(record.id)
        return job

    def _pending_reason(self, job_id: str) -> str:
        misfit = self.queue.misfit(job_id)
        return misfit.summary() if misfit is not None else "waiting for the next placement cycle"

    async def _write(self, writes: Sequence[StatusWrite]) -> list[JobRecord | None]:
        revisions = await self.store.write_statuses(writes)
        out: list[JobRecord | None] = []
        for write, revision in zip(writes, revisions, strict=True):
            if revision is None:
                fresh = await self.store.read_job(write.job_id)
                if fresh is not None:
                    self._merge(write.job_id, fresh.status, fresh.revision, fresh.status_blob)
                out.append(None)
            else:
                out.append(self._merge(write.job_id, write.status, revision, write.blob))
        return out

    # ------------------------------------------------------------------ API
    async def submit(self, items: Sequence[tuple[pb.JobSpec, str]], batch: bool) -> list[tuple[pb.Job, bool]]:
        problems: list[str] = []
        for i, (spec, key) in enumerate(items):
            where = f"jobs[{i}]." if batch else ""
            problems += validate_spec(spec, f"{where}spec")
            if len(key) > MAX_IDEMPOTENCY_KEY:
                problems.append(f"{where}idempotency_key: longer than {MAX_IDEMPOTENCY_KEY} characters")
        if problems:
            raise HubError("INVALID_ARGUMENT", "; ".join(problems))
        now = time.time()
        trace_context = telemetry.inject()
        created_at = timestamps.at(now)
        pending = sm.new_pending(now)
        pending_blob = pending.SerializeToString()
        new_jobs: list[NewJob] = []
        # For each item, the index of the job that answers it; a key repeated in the batch
        # answers with the first occurrence's job, as a retry would.
        answer: list[int] = []
        first_by_key: dict[str, int] = {}
        for spec, key in items:
            if key and key in first_by_key:
                answer.append(first_by_key[key])
                continue
            job = pb.Job(
                id=new_job_id(),
                spec=spec,
                idempotency_key=key,
                trace_context=trace_context,
                create_time=created_at,
            )
            job.spec.queue = job.spec.queue or "default"
            if key:
                first_by_key[key] = len(new_jobs)
            answer.append(len(new_jobs))
            new_jobs.append(NewJob.of(job, pending, pending_blob))
        with telemetry.tracer().start_as_current_span("hub.store_jobs", attributes={"jobs": len(new_jobs)}):
            stored = await self._store(new_jobs)
        outs: list[tuple[pb.Job, bool]] = []
        for new, (record, created) in zip(new_jobs, stored, strict=True):
            held = self._add(record, new.request if created else None)
            if created and held.revision == record.seq:
                # Unchanged since it was stored: answer with the job at hand, not a parsed copy.
                new.job.status.CopyFrom(pending)
                outs.append((self._job_out(held, new.job), created))
            else:
                outs.append((self._job_out(held), created))
        results: list[tuple[pb.Job, bool]] = []
        answered: set[int] = set()
        for index in answer:
            out, created = outs[index]
            results.append((out, created and index not in answered))
            answered.add(index)
        if any(created for _, created in stored):
            self._wake.set()
        log.debug("jobs submitted", count=len(new_jobs), created=sum(1 for _, c in stored if c))
        return results

    async def _store(self, jobs: list[NewJob]) -> list[tuple[JobRecord, bool]]:
        """Store jobs together with those of concurrent submits (group commit).

        While one etcd transaction is in flight the next submits queue up and go in the
        following one, so many single SubmitJob calls cost a few transactions, not one each;
        an idle hub writes at once.
        """
        future: asyncio.Future[list[tuple[JobRecord, bool]]] = asyncio.get_running_loop().create_future()
        self._intake.append((jobs, future))
        self._intake_ready.set()
        return await future

    async def _intake_loop(self) -> None:
        while True:
            await self._intake_ready.wait()
            self._intake_ready.clear()
            groups, self._intake = self._intake, []
            if not groups:
                continue
            writing = [job for jobs, _ in groups for job in jobs]
            self._creating.update((job.record.id, job) for job in writing)
            try:
                stored = await self.store.create_jobs(writing)
            except Exception as exc:
                for _, future in groups:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                for job in writing:
                    self._creating.pop(job.record.id, None)
            start = 0
            for jobs, future in groups:
                if not future.done():
                    future.set_result(stored[start : start + len(jobs)])
                start += len(jobs)

    def get(self, job_id: str) -> pb.Job:
        record = self.jobs.get(job_id)
        if record is None:
            raise HubError("NOT_FOUND", f"job {job_id!r} not found")
        return self._job_out(record)

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
            (r for r in self.jobs.values() if (r.seq, r.id) > after and flt.matches(r)),
            key=lambda r: (r.seq, r.id),
        )
        page = matching[:page_size]
        next_token = f"{page[-1].seq}:{page[-1].id}" if len(matching) > page_size else ""
        return [self._job_out(r) for r in page], next_token, revision

    def job_stats(self, queue: str) -> tuple[dict[str, int], int, int]:
        """(jobs per state name, total, revision) from counters: cheap enough for clients to poll."""
        counts: dict[int, int] = {}
        for (job_queue, state), n in self.counts.items():
            if n and (not queue or job_queue == queue):
                counts[state] = counts.get(state, 0) + n
        by_state = {sm.state_name(state): n for state, n in counts.items()}
        return by_state, sum(counts.values()), self.events.revision

    async def cancel(self, job_id: str, reason: str) -> pb.Job:
        for _ in range(10):
            record = self.jobs.get(job_id)
            if record is None:
                raise HubError("NOT_FOUND", f"job {job_id!r} not found")
            status = record.status
            try:
                outcome = sm.request_cancel(status, reason, time.time())
            except sm.TransitionError as exc:
                raise HubError("FAILED_PRECONDITION", f"job {job_id}: {exc}") from None
            if outcome.status is status:
                written: JobRecord | None = record
            else:
                (written,) = await self._write([StatusWrite.of(job_id, outcome.status, record.revision)])
            if written is None:
                continue  # lost a race with a status update: re-read and decide again
            if outcome.send_delete:
                job = written.job
                self.commands.queue(job, delete_command(job, reason))
            else:
                self._wake.set()
            log.info("job cancel requested", job_id=job_id, state=sm.state_name(written.state))
            return self._job_out(written)
        raise HubError("ABORTED", f"job {job_id} kept changing; try again")

    def explain(self, job: pb.Job, seq: int | None = None) -> pb.Explanation:
        request = convert.job_request(job, seq if seq is not None else 1 << 62)
        verdicts = evaluate(request, self.registry.views(time.time()), self.weights)
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
        misfit = self.queue.misfit(job.id) if job.id and status.state == S.PENDING else None
        if misfit is not None:
            out.summary = misfit.summary()
        else:
            out.summary = decision.summary()
            if not job.id and decision.cluster:
                out.summary = "would be " + out.summary
        return out

    def explain_job(self, job_id: str) -> pb.Explanation:
        record = self.jobs.get(job_id)
        if record is None:
            raise HubError("NOT_FOUND", f"job {job_id!r} not found")
        return self.explain(record.job, record.seq)

    def explain_spec(self, spec: pb.JobSpec) -> pb.Explanation:
        problems = validate_spec(spec)
        if problems:
            raise HubError("INVALID_ARGUMENT", "; ".join(problems))
        return self.explain(pb.Job(spec=spec))

    def clusters(self) -> list[pb.Cluster]:
        now = time.time()
        return [
            c.to_pb(now, self.registry.timeout, self.active.get(c.name, 0))
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
        await self.store.put_cluster(admin)
        state.admin = admin
        log.info("cluster cordon changed", cluster=name, cordoned=cordoned, reason=reason)
        self._clusters_changed()
        return self.cluster(name)

    async def watch(
        self, from_revision: int, queue: str = "", job_ids: Iterable[str] = ()
    ) -> AsyncIterator[hub_pb.JobEvent]:
        """Job changes after `from_revision` (0: from now), from memory when recent enough, else etcd."""
        ids = frozenset(job_ids)

        def wanted(change: Change) -> bool:
            if ids and change.job_id not in ids:
                return False
            return not queue or change.queue == queue

        async def replay(after: int, until: int) -> AsyncIterator[Change]:
            async for revision, job_id, blob in self.store.watch_statuses(after):
                record = self.jobs.get(job_id)
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
        record = self.jobs.get(change.job_id)
        if record is None:
            return None  # deleted since
        job = record.spec_record
        job.ClearField("trace_context")
        job.status.ParseFromString(change.status_blob)
        job.revision = change.revision
        if job.status.state == S.PENDING:
            job.pending_reason = self._pending_reason(job.id)
        return hub_pb.JobEvent(revision=change.revision, job=job)

    async def _watch_own_statuses(self) -> None:
        while not self._stopping:
            try:
                async for revision, job_id, blob in self.store.watch_statuses(self.events.revision):
                    record = self.jobs.get(job_id)
                    if record is None:
                        creating = self._creating.get(job_id)
                        if creating is not None:
                            # Our own submit, its transaction's reply not yet handled: the record
                            # is at hand (created at this revision), no need to read it back.
                            record = self._add(creating.stored_at(revision), creating.request)
                        else:
                            loaded = await self.store.read_job(job_id)
                            if loaded is None:
                                continue
                            record = self._add(loaded)
                    if revision > record.revision:
                        self._merge(job_id, pb.JobStatus.FromString(blob), revision, blob)
                    self.events.publish(Change(revision, job_id, record.queue, blob))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "status watch interrupted; resuming", error=str(exc), revision=self.events.revision
                )
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ placement
    def _clusters_changed(self) -> None:
        """Capacity or clusters changed: shapes that fit nowhere get another look."""
        self.queue.unblock()
        self._wake.set()

    async def _schedule_loop(self) -> None:
        """Place as soon as something changed; what changes during a cycle waits for the next.

        Batches form by themselves: jobs submitted while a cycle writes its dispatches are
        placed together by the next one, so an idle hub places a job at once and a busy one
        in large batches. `batch_window_seconds` adds a fixed wait before each cycle.
        """
        while True:
            await self._wake.wait()
            # At least one turn of the loop: submits finishing in this same turn join the batch.
            await asyncio.sleep(self.config.batch_window_seconds)
            self._wake.clear()
            try:
                await self._place_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("placement cycle failed; retrying")
                await asyncio.sleep(1)
                self._clusters_changed()

    async def _place_pending(self) -> None:
        if not self.queue:
            return
        now = time.time()
        cycle_start = time.time_ns()
        limit = self.config.max_dispatch_per_cycle
        with telemetry.tracer().start_as_current_span(
            "hub.place_batch", attributes={"queued": len(self.queue)}
        ):
            placed = self.queue.cycle(self.registry.views(now), self.weights, limit)
        if len(placed) >= limit:
            self._wake.set()  # more may fit: carry on right after this batch is written
        writes: list[StatusWrite] = []
        # The job, parsed once: its status to dispatch from, then its spec for the command.
        chosen: dict[str, tuple[JobRequest, Decision, pb.Job]] = {}
        for request, decision in placed:
            verdict = decision.chosen
            assert verdict is not None and decision.cluster is not None
            record = self.jobs[decision.job_id]
            job = record.job
            status = sm.dispatch(
                job.status,
                decision.cluster,
                convert.assignments_pb(verdict.assignments),
                convert.score_pb(verdict.score),
                now,
            )
            writes.append(StatusWrite.of(decision.job_id, status, record.revision))
            chosen[decision.job_id] = (request, decision, job)
        if not writes:
            return
        for write, written in zip(writes, await self._write(writes), strict=True):
            request, decision, job = chosen[write.job_id]
            if written is None:
                # Raced with another writer (a cancel): decide again if the job still waits.
                current = self.jobs.get(write.job_id)
                if current is not None and current.state == S.PENDING:
                    self.queue.add(request)
                    self._wake.set()
                continue
            verdict = decision.chosen
            assert verdict is not None and decision.cluster is not None
            job.status.CopyFrom(write.status)  # what was written
            if telemetry.recording():
                # The job's own placement span, in its submit's trace: the cycle that decided it.
                telemetry.tracer().start_span(
                    "hub.place",
                    context=telemetry.extract(job.trace_context),
                    start_time=cycle_start,
                    attributes={
                        "job.id": write.job_id,
                        "cluster": decision.cluster,
                        "score": verdict.score.total,
                        "clusters.considered": len(decision.verdicts),
                    },
                ).end()
            self.registry.clusters[decision.cluster].reserve(
                request, write.status.generation, verdict.assignments
            )
            self.commands.queue(job, create_command(job, self.config.hub_id))
            log.info(
                "job dispatched",
                job_id=write.job_id,
                trace_id=telemetry.trace_id_of(job.trace_context),
                cluster=decision.cluster,
                generation=write.status.generation,
                score=verdict.score.total,
            )

    # ------------------------------------------------------------------ retention
    async def _retention_loop(self) -> None:
        retention = self.config.finished_job_retention_seconds
        if retention <= 0:
            return
        while True:
            await asyncio.sleep(max(1.0, min(retention / 4, 300.0)))
            try:
                await self.forget_finished(time.time() - retention)
            except Exception as exc:
                log.warning("finished-job cleanup failed; will retry", error=str(exc))

    async def forget_finished(self, finished_before: float) -> int:
        """Delete jobs that finished before `finished_before` (seconds since the epoch)."""
        old = [
            r
            for r in self.jobs.values()
            if sm.is_terminal(r.state) and r.status.finish_time.ToNanoseconds() / 1e9 < finished_before
        ]
        deleted = 0
        for record, ok in zip(old, await self.store.delete_jobs(old), strict=True):
            if ok:
                self._forget(record)
                deleted += 1
        if deleted:
            log.info("finished jobs deleted", count=deleted)
        return deleted

    # ------------------------------------------------------------------ status updates
    async def _consume_status(self) -> None:
        statuses = bus.consume(
            self.js,
            f"{bus.PREFIX}.status.*",
            "hub-statuses",
            bus.STATUS_STREAM,
            ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=10, max_ack_pending=4096),
            2048,
            lambda: self._stopping,
            replaces="hub",
        )
        async for msgs in statuses:
            try:
                await self._apply_status_batch(msgs)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("applying status updates failed; they will be redelivered")
                await asyncio.sleep(0.5)

    def _take_update(
        self, update: agent_pb.StatusUpdate, now: float, pending: dict[str, tuple[pb.JobStatus, int]]
    ) -> bool:
        """Apply one update to the job's status as `pending` (the batch's writes so far) holds
        it; whether it changed the status."""
        found = pending.get(update.job_id)
        if found is None:
            record = self.jobs.get(update.job_id)
            if record is None:
                return False
            found = (record.status, record.revision)
        outcome = sm.apply_update(
            found[0],
            update.cluster,
            update.generation,
            update.state,
            now,
            reason=update.reason,
            message=update.message,
        )
        if outcome.status is None:
            log.debug("status update ignored", job_id=update.job_id, why=outcome.ignored)
            return False
        pending[update.job_id] = (outcome.status, found[1])
        log.debug(
            "job status",
            job_id=update.job_id,
            cluster=update.cluster,
            state=sm.state_name(update.state),
            reason=update.reason,
        )
        return True

    async def _apply_status_batch(self, msgs: list[Any]) -> None:
        """Apply the updates in a batch of messages with one etcd write per job, then ack.

        A message is acked once every update in it is applied (or ignored as stale); a lost
        compare-and-swap naks the messages involved, and the redelivered updates apply again
        idempotently.
        """
        now = time.time()
        pending: dict[str, tuple[pb.JobStatus, int]] = {}
        msgs_by_job: dict[str, set[int]] = {}
        # Without a span to make or a debug line to write, no per-update trace context is set up.
        traced = telemetry.recording() or logs.debug_enabled()
        for index, msg in enumerate(msgs):
            for update in _updates_in(msg):
                with (
                    telemetry.child_span(
                        "hub.status",
                        update.trace_context,
                        kind=trace.SpanKind.CONSUMER,
                        attributes={
                            "job.id": update.job_id,
                            "cluster": update.cluster,
                            "state": sm.state_name(update.state),
                        },
                    )
                    if traced
                    else contextlib.nullcontext()
                ):
                    if self._take_update(update, now, pending):
                        msgs_by_job.setdefault(update.job_id, set()).add(index)
        writes = [StatusWrite.of(job_id, status, revision) for job_id, (status, revision) in pending.items()]
        freed = False
        lost: set[int] = set()
        for write, record in zip(writes, await self._write(writes), strict=True):
            if record is None:
                lost |= msgs_by_job[write.job_id]
                continue
            if sm.is_terminal(write.status.state):
                state = self.registry.clusters.get(write.status.cluster)
                if state is not None:
                    state.release(write.job_id, write.status.generation)
                freed = True
        await asyncio.gather(
            *(msg.nak(delay=0.1) if index in lost else msg.ack() for index, msg in enumerate(msgs)),
            return_exceptions=True,
        )
        if freed:
            self._clusters_changed()

    # ------------------------------------------------------------------ cluster reports
    async def _subscribe_reports(self) -> None:
        for kind in ("heartbeat", "inventory", "datasets"):
            sub = await self.js.subscribe(
                f"{bus.PREFIX}.{kind}.*",
                stream=bus.REPORTS_STREAM,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                cb=self._on_report,
            )
            self._subs.append(sub)
        self._subs.append(
            await self.nc.subscribe(f"{bus.PREFIX}.gc.*", queue="hub", cb=self._on_orphan_query)
        )

    async def _on_orphan_query(self, msg: Any) -> None:
        """Answer an agent's garbage-collection question from the dispatch records."""
        try:
            query = agent_pb.OrphanQuery.FromString(msg.data)
            orphans = []
            for ref in query.workloads:
                record = self.jobs.get(ref.job_id)
                if sm.is_orphan(record.status if record else None, query.cluster, ref.generation):
                    orphans.append(ref)
            await msg.respond(agent_pb.OrphanReply(orphans=orphans).SerializeToString())
        except Exception:
            log.exception("bad orphan query", subject=msg.subject)

    async def _on_report(self, msg: Any) -> None:
        try:
            kind = msg.subject.split(".")[-2]
            cluster = bus.cluster_of(msg.subject)
            state, added = self.registry.get_or_add(cluster)
            if added:
                await self.store.put_cluster(state.admin)
                log.info("cluster registered", cluster=cluster)
            stamped = msg.metadata.timestamp.timestamp() if msg.metadata else time.time()
            if kind == "heartbeat":
                state.heartbeat = agent_pb.Heartbeat.FromString(msg.data)
                state.last_seen = min(max(state.last_seen, stamped), time.time())
                self._check_health()
            elif kind == "inventory":
                state.apply_inventory(agent_pb.Inventory.FromString(msg.data))
                state.last_seen = max(state.last_seen, min(stamped, time.time()))
                self._clusters_changed()
            elif kind == "datasets":
                state.datasets = agent_pb.DataLocalityReport.FromString(msg.data)
                self._clusters_changed()
        except Exception:
            log.exception("bad cluster report", subject=msg.subject)

    def _check_health(self) -> None:
        ready = self.registry.ready_names(time.time())
        if ready != self._ready_clusters:
            for name in ready - self._ready_clusters:
                log.info("cluster ready", cluster=name)
            for name in self._ready_clusters - ready:
                log.warning("cluster not ready", cluster=name)
            self._ready_clusters = ready
            self._clusters_changed()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.registry.timeout / 4))
            self._check_health()


def _updates_in(msg: Any) -> list[agent_pb.StatusUpdate]:
    """The updates a message carries: a StatusBatch, or one StatusUpdate (earlier agents)."""
    if (msg.headers or {}).get(bus.MSG_TYPE_HEADER) == "StatusBatch":
        return list(agent_pb.StatusBatch.FromString(msg.data).updates)
    update = agent_pb.StatusUpdate.FromString(msg.data)
    if not update.trace_context:
        update.trace_context.update(bus.trace_headers(msg))
    return [update]
