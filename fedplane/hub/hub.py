"""The hub: durable job intake, event-driven placement, dispatch and status, around the pure core.

Everything that decides lives in fedplane.core; this module moves data between etcd, NATS,
the core and the API. The job table merges two sources monotonically by etcd revision:
the hub's own compare-and-swap writes (so it sees them at once) and its own watch on the
status keys (so that every change up to the watch's revision is in the table). That watch
also feeds the resumable event stream that clients watch.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace

from fedplane import bus, logs, tasks, telemetry
from fedplane.config import HubConfig
from fedplane.core import dispatch as sm
from fedplane.core.placement import Decision, Weights, evaluate, place_batch
from fedplane.core.validation import validate_spec
from fedplane.hub import convert
from fedplane.hub.clusters import ClusterRegistry
from fedplane.hub.commands import CommandSender, create_command, delete_command
from fedplane.hub.events import EventLog, WatchFellBehind
from fedplane.hub.store import JobRecord, RevisionCompacted, StatusWrite, Store
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import hub_pb2 as hub_pb
from fedplane.v1 import types_pb2 as pb

log = logs.get("fedplane.hub")
S = pb.JobState
MAX_IDEMPOTENCY_KEY = 256
EVENT_BUFFER = 20_000


class HubError(Exception):
    """An API-level refusal; `code` names the gRPC status the service maps it to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def new_job_id() -> str:
    """Time-ordered, DNS-label-safe job id."""
    return f"j{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


def _now_ts(now: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(now * 1e9))
    return ts


@dataclass
class JobFilter:
    queue: str = ""
    states: frozenset[int] = frozenset()
    cluster: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def matches(self, job: pb.Job) -> bool:
        if self.queue and job.spec.queue != self.queue:
            return False
        if self.states and job.status.state not in self.states:
            return False
        if self.cluster and job.status.cluster != self.cluster:
            return False
        return all(job.spec.labels.get(k) == v for k, v in self.labels.items())


class Hub:
    def __init__(self, config: HubConfig, store: Store, nc: NATS, js: JetStreamContext) -> None:
        self.config = config
        self.store = store
        self.nc = nc
        self.js = js
        self.weights = Weights(**vars(config.weights))
        self.jobs: dict[str, JobRecord] = {}
        self.pending_reasons: dict[str, str] = {}
        self.registry = ClusterRegistry(config.heartbeat_timeout_seconds)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self.events = EventLog(EVENT_BUFFER)
        self.commands = CommandSender(js)
        self._ready_clusters: frozenset[str] = frozenset()
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def start(cls, config: HubConfig) -> Hub:
        store = await Store.connect(config.etcd_endpoint, config.etcd_prefix)
        nc = await bus.connect(config.nats_url, f"fedplane-hub-{config.hub_id}")
        js = nc.jetstream()
        await bus.ensure_streams(js, config.stream_max_age_seconds)
        hub = cls(config, store, nc, js)
        await hub._recover()
        return hub

    async def _recover(self) -> None:
        """Load every job and cluster, then resume: watch, consume, and re-send what may be unsent."""
        records, revision = await self.store.load_jobs()
        self.jobs = {r.job.id: r for r in records}
        self.events.revision = revision
        for name, admin in (await self.store.load_clusters()).items():
            state, _ = self.registry.get_or_add(name)
            state.admin = admin
        for record in records:
            status = record.job.status
            if status.state in sm.ON_CLUSTER and status.cluster:
                # Hold the capacity until the cluster's inventory confirms it.
                state, _ = self.registry.get_or_add(status.cluster)
                state.reserve(
                    convert.job_request(record.job, record.seq),
                    status.generation,
                    convert.assignments_core(status.assignments),
                )
            if status.state == S.DISPATCHED:
                self.commands.queue(record.job, create_command(record.job, self.config.hub_id))
            elif status.state == S.CANCELLING:
                self.commands.queue(record.job, delete_command(record.job, status.message))
        log.info("hub recovered", jobs=len(records), revision=revision, resend=len(self.commands))
        self._tasks = [
            asyncio.create_task(self._watch_own_statuses(), name="hub-watch"),
            asyncio.create_task(self._schedule_loop(), name="hub-schedule"),
            asyncio.create_task(self._consume_status(), name="hub-status"),
            asyncio.create_task(self._health_loop(), name="hub-health"),
            asyncio.create_task(self.commands.resend_forever(), name="hub-resend"),
            asyncio.create_task(self._retention_loop(), name="hub-retention"),
        ]
        await self._subscribe_reports()
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self.events.close()
        # Let the status consumer finish its batch, so no fetched update waits out its ack deadline.
        await tasks.finish_first(next((t for t in self._tasks if t.get_name() == "hub-status"), None), 3)
        await tasks.cancel_all(self._tasks)
        for sub in self._subs:
            await tasks.bounded(sub.unsubscribe(), 2, "unsubscribe")
        await tasks.bounded(self.nc.close(), 5, "NATS close")
        await tasks.bounded(self.store.close(), 5, "etcd close")

    # ------------------------------------------------------------------ job table
    def _merge(self, job_id: str, status: pb.JobStatus, revision: int) -> JobRecord | None:
        """Apply a status at `revision` unless the table already holds a newer one."""
        record = self.jobs.get(job_id)
        if record is None:
            return None
        if revision > record.revision:
            record.job.status.CopyFrom(status)
            record.revision = revision
        return record

    def _job_out(self, record: JobRecord) -> pb.Job:
        job = pb.Job()
        job.CopyFrom(record.job)
        job.revision = record.revision
        job.ClearField("trace_context")
        if job.status.state == S.PENDING:
            job.pending_reason = self.pending_reasons.get(job.id, "waiting for the next placement cycle")
        return job

    async def _write(self, writes: Sequence[StatusWrite]) -> list[JobRecord | None]:
        revisions = await self.store.write_statuses(writes)
        out: list[JobRecord | None] = []
        for write, revision in zip(writes, revisions, strict=True):
            if revision is None:
                fresh = await self.store.read_job(write.job_id)
                if fresh is not None:
                    self._merge(write.job_id, fresh.job.status, fresh.revision)
                out.append(None)
            else:
                out.append(self._merge(write.job_id, write.status, revision))
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
        jobs: list[pb.Job] = []
        # For each item, the index of the job that answers it; a key repeated in the batch
        # answers with the first occurrence's job, as a retry would.
        answer: list[int] = []
        first_by_key: dict[str, int] = {}
        for spec, key in items:
            if key and key in first_by_key:
                answer.append(first_by_key[key])
                continue
            job = pb.Job(id=new_job_id(), spec=spec, idempotency_key=key, trace_context=trace_context)
            job.spec.queue = job.spec.queue or "default"
            job.create_time.CopyFrom(_now_ts(now))
            job.status.CopyFrom(sm.new_pending(now))
            if key:
                first_by_key[key] = len(jobs)
            answer.append(len(jobs))
            jobs.append(job)
        with telemetry.tracer().start_as_current_span("hub.store_jobs", attributes={"jobs": len(jobs)}):
            stored = await self.store.create_jobs(jobs)
        outs: list[tuple[pb.Job, bool]] = []
        for record, created in stored:
            self.jobs.setdefault(record.job.id, record)
            outs.append((self._job_out(self.jobs[record.job.id]), created))
        results: list[tuple[pb.Job, bool]] = []
        answered: set[int] = set()
        for index in answer:
            job, created = outs[index]
            results.append((job, created and index not in answered))
            answered.add(index)
        if any(created for _, created in stored):
            self._wake.set()
        for job, created in outs:
            log.info("job submitted", job_id=job.id, queue=job.spec.queue, created=created)
        return results

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
        matching = sorted(
            (r for r in self.jobs.values() if (r.seq, r.job.id) > after and flt.matches(r.job)),
            key=lambda r: (r.seq, r.job.id),
        )
        page = matching[:page_size]
        next_token = f"{page[-1].seq}:{page[-1].job.id}" if len(matching) > page_size else ""
        return [self._job_out(r) for r in page], next_token, revision

    async def cancel(self, job_id: str, reason: str) -> pb.Job:
        for _ in range(10):
            record = self.jobs.get(job_id)
            if record is None:
                raise HubError("NOT_FOUND", f"job {job_id!r} not found")
            try:
                outcome = sm.request_cancel(record.job.status, reason, time.time())
            except sm.TransitionError as exc:
                raise HubError("FAILED_PRECONDITION", f"job {job_id}: {exc}") from None
            if outcome.status is record.job.status:
                written: JobRecord | None = record
            else:
                (written,) = await self._write([StatusWrite(job_id, outcome.status, record.revision)])
            if written is None:
                continue  # lost a race with a status update: re-read and decide again
            if outcome.send_delete:
                self.commands.queue(written.job, delete_command(written.job, reason))
                await self.commands.flush()
            else:
                self._wake.set()
            log.info("job cancel requested", job_id=job_id, state=sm.state_name(written.job.status.state))
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
        if status.state == S.PENDING and job.id:
            out.summary = self.pending_reasons.get(job.id, decision.summary())
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
        active: dict[str, int] = {}
        for record in self.jobs.values():
            status = record.job.status
            if status.cluster and status.state in sm.ON_CLUSTER | {S.CANCELLING}:
                active[status.cluster] = active.get(status.cluster, 0) + 1
        return [
            c.to_pb(now, self.registry.timeout, active.get(c.name, 0))
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
        self._wake.set()
        return self.cluster(name)

    async def watch(
        self, from_revision: int, queue: str = "", job_ids: Iterable[str] = ()
    ) -> AsyncIterator[hub_pb.JobEvent]:
        """Job changes after `from_revision` (0: from now), from memory when recent enough, else etcd."""
        ids = frozenset(job_ids)

        def wanted(event: hub_pb.JobEvent) -> bool:
            if ids and event.job.id not in ids:
                return False
            return not queue or event.job.spec.queue == queue

        async def replay(after: int, until: int) -> AsyncIterator[hub_pb.JobEvent]:
            async for revision, job_id, status in self.store.watch_statuses(after):
                record = self.jobs.get(job_id)
                if record is not None:
                    yield self._event(record, status, revision)
                if revision >= until:
                    return

        try:
            async for event in self.events.stream(from_revision, wanted, replay):
                yield event
        except RevisionCompacted as exc:
            raise HubError(
                "OUT_OF_RANGE",
                f"from_revision {from_revision}: {exc}; list again and watch from its revision",
            ) from None
        except WatchFellBehind as exc:
            raise HubError("UNAVAILABLE", str(exc)) from None

    def _event(self, record: JobRecord, status: pb.JobStatus, revision: int) -> hub_pb.JobEvent:
        job = self._job_out(record)
        job.status.CopyFrom(status)
        job.revision = revision
        return hub_pb.JobEvent(revision=revision, job=job)

    async def _watch_own_statuses(self) -> None:
        while not self._stopping:
            try:
                async for revision, job_id, status in self.store.watch_statuses(self.events.revision):
                    if job_id not in self.jobs:
                        loaded = await self.store.read_job(job_id)
                        if loaded is None:
                            continue
                        self.jobs.setdefault(job_id, loaded)
                    record = self.jobs[job_id]
                    self._merge(job_id, status, revision)
                    self.events.publish(self._event(record, status, revision))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "status watch interrupted; resuming", error=str(exc), revision=self.events.revision
                )
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ placement
    async def _schedule_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.config.batch_window_seconds)
            self._wake.clear()
            try:
                await self._place_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("placement cycle failed; retrying")
                await asyncio.sleep(1)
                self._wake.set()

    async def _place_pending(self) -> None:
        pending = [r for r in self.jobs.values() if r.job.status.state == S.PENDING]
        if not pending:
            return
        now = time.time()
        cycle_start = time.time_ns()
        requests = {r.job.id: convert.job_request(r.job, r.seq) for r in pending}
        with telemetry.tracer().start_as_current_span("hub.place_batch", attributes={"jobs": len(pending)}):
            decisions = place_batch(requests.values(), self.registry.views(now), self.weights)
        writes: list[StatusWrite] = []
        chosen: dict[str, Decision] = {}
        for decision in decisions:
            if decision.cluster is None:
                self.pending_reasons[decision.job_id] = decision.summary()
                continue
            verdict = decision.chosen
            assert verdict is not None
            record = self.jobs[decision.job_id]
            status = sm.dispatch(
                record.job.status,
                decision.cluster,
                convert.assignments_pb(verdict.assignments),
                convert.score_pb(verdict.score),
                now,
            )
            writes.append(StatusWrite(decision.job_id, status, record.revision))
            chosen[decision.job_id] = decision
        if not writes:
            return
        for write, written in zip(writes, await self._write(writes), strict=True):
            if written is None:
                self._wake.set()  # raced with another writer: decide again next cycle
                continue
            decision = chosen[write.job_id]
            verdict = decision.chosen
            assert verdict is not None and decision.cluster is not None
            # The job's own placement span, in its submit's trace: the cycle that decided it.
            telemetry.tracer().start_span(
                "hub.place",
                context=telemetry.extract(written.job.trace_context),
                start_time=cycle_start,
                attributes={
                    "job.id": write.job_id,
                    "cluster": decision.cluster,
                    "score": verdict.score.total,
                    "clusters.considered": len(decision.verdicts),
                },
            ).end()
            self.pending_reasons.pop(write.job_id, None)
            state = self.registry.clusters[decision.cluster]
            state.reserve(requests[write.job_id], write.status.generation, verdict.assignments)
            self.commands.queue(written.job, create_command(written.job, self.config.hub_id))
            log.info(
                "job dispatched",
                job_id=write.job_id,
                trace_id=telemetry.trace_id_of(written.job.trace_context),
                cluster=decision.cluster,
                generation=write.status.generation,
                score=verdict.score.total,
            )
        await self.commands.flush()

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
            if sm.is_terminal(r.job.status.state)
            and r.job.status.finish_time.ToNanoseconds() / 1e9 < finished_before
        ]
        deleted = 0
        for record, ok in zip(old, await self.store.delete_jobs(old), strict=True):
            if ok:
                self.jobs.pop(record.job.id, None)
                self.pending_reasons.pop(record.job.id, None)
                deleted += 1
        if deleted:
            log.info("finished jobs deleted", count=deleted)
        return deleted

    # ------------------------------------------------------------------ status updates
    async def _consume_status(self) -> None:
        sub = await self.js.pull_subscribe(
            f"{bus.PREFIX}.status.*",
            durable="hub",
            stream=bus.STATUS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=10, max_ack_pending=20_000),
        )
        async for msgs in bus.batches(sub, 512, lambda: self._stopping):
            try:
                await self._apply_status_batch(msgs)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("applying status updates failed; they will be redelivered")
                await asyncio.sleep(0.5)

    async def _apply_status_batch(self, msgs: list[Any]) -> None:
        now = time.time()
        pending: dict[str, tuple[pb.JobStatus, int]] = {}
        msgs_by_job: dict[str, list[Any]] = {}
        ack_now: list[Any] = []
        for msg in msgs:
            update = agent_pb.StatusUpdate.FromString(msg.data)
            with telemetry.tracer().start_as_current_span(
                "hub.status",
                context=telemetry.extract(bus.trace_headers(msg)),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "job.id": update.job_id,
                    "cluster": update.cluster,
                    "state": sm.state_name(update.state),
                },
            ):
                record = self.jobs.get(update.job_id)
                if record is None:
                    ack_now.append(msg)
                    continue
                base, revision = pending.get(update.job_id, (record.job.status, record.revision))
                outcome = sm.apply_update(
                    base,
                    update.cluster,
                    update.generation,
                    update.state,
                    now,
                    reason=update.reason,
                    message=update.message,
                )
                if outcome.status is None:
                    log.debug("status update ignored", job_id=update.job_id, why=outcome.ignored)
                    ack_now.append(msg)
                    continue
                pending[update.job_id] = (outcome.status, revision)
                msgs_by_job.setdefault(update.job_id, []).append(msg)
                log.info(
                    "job status",
                    job_id=update.job_id,
                    cluster=update.cluster,
                    state=sm.state_name(update.state),
                    reason=update.reason,
                )
        writes = [StatusWrite(job_id, status, revision) for job_id, (status, revision) in pending.items()]
        freed = False
        for write, record in zip(writes, await self._write(writes), strict=True):
            job_msgs = msgs_by_job[write.job_id]
            if record is None:
                await asyncio.gather(*(m.nak(delay=0.1) for m in job_msgs), return_exceptions=True)
                continue
            ack_now.extend(job_msgs)
            if sm.is_terminal(write.status.state):
                state = self.registry.clusters.get(write.status.cluster)
                if state is not None:
                    state.release(write.job_id, write.status.generation)
                freed = True
        await asyncio.gather(*(m.ack() for m in ack_now), return_exceptions=True)
        if freed:
            self._wake.set()

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
                if sm.is_orphan(record.job.status if record else None, query.cluster, ref.generation):
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
                self._wake.set()
            elif kind == "datasets":
                state.datasets = agent_pb.DataLocalityReport.FromString(msg.data)
                self._wake.set()
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
            self._wake.set()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.registry.timeout / 4))
            self._check_health()
