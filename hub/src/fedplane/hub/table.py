"""The job table: every job the hub holds, its counters and its pending queue, kept in step
with etcd, and the one path by which the hub writes a job's status.

The table merges two sources monotonically by etcd revision: the hub's own compare-and-swap
writes (so it sees them at once) and its own watch on the status keys (see feed.py), so that
every change up to the watch's revision is in the table. A status only ever replaces an older
one, whichever source brings it first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from fedplane.core import dispatch as sm
from fedplane.core.model import JobRequest
from fedplane.core.queueing import Queues, demand
from fedplane.hub import convert
from fedplane.hub.store import NO_FENCE, Fence, FenceLost, JobStore, StoredJob
from fedplane.runtime import telemetry
from fedplane.v1 import types_pb2 as pb

S = sm.S
T = TypeVar("T")
# The fence of a replica that does not lead: the table refuses fenced writes under it.
NOT_LEADING = Fence(b"", -1)


def _nothing() -> None:
    pass


# States in which a job holds (or is about to hold) capacity in its cluster.
HOLDING = sm.ON_CLUSTER | {S.CANCELLING}


def stored_idempotency_key(submitted_by: str, key: str) -> str:
    """The idempotency key as stored: scoped to its submitter, so that knowing another caller's
    key finds nothing. A hub without authentication (no submitter) keeps the bare keys it always
    stored. Keys hold no NUL (the intake refuses one), so the scoped form never equals a bare key."""
    if not key or not submitted_by:
        return key
    return f"{submitted_by}\x00{key}"


@dataclass(slots=True)
class JobRecord:
    """A job as the hub holds it: serialized, with the few fields it reads often kept parsed.

    A parsed protobuf Job costs about 3 KB of memory and its bytes about 250, which is the
    difference between a million queued jobs fitting in the hub or not. `job` parses on demand.
    """

    id: str
    # Create revision of the spec key: a total order of submission.
    seq: int
    # Mod revision of the status key: the CAS token for the next status write.
    revision: int
    # The stored spec record (a Job without status), exactly as in etcd.
    spec_blob: bytes
    status_blob: bytes
    state: int
    cluster: str
    generation: int
    queue: str
    # As etcd holds it: scoped to the submitter (see stored_idempotency_key).
    idempotency_key: str
    # The flavor whose quota the job holds while on a cluster ("" for none).
    flavor: str = ""
    # Its priority since it was changed (SetJobPriority), in place of its spec's.
    priority: int | None = None

    @classmethod
    def of(cls, job: pb.Job, seq: int, revision: int, spec_blob: bytes, status_blob: bytes) -> JobRecord:
        status = job.status
        return cls(
            job.id,
            seq,
            revision,
            spec_blob,
            status_blob,
            status.state,
            status.cluster,
            status.generation,
            job.spec.queue,
            stored_idempotency_key(job.submitted_by, job.idempotency_key),
            status.flavor,
            status.priority if status.HasField("priority") else None,
        )

    @classmethod
    def stored(cls, stored: StoredJob) -> JobRecord:
        job = pb.Job.FromString(stored.spec_blob)
        job.status.ParseFromString(stored.status_blob)
        return cls.of(job, stored.seq, stored.revision, stored.spec_blob, stored.status_blob)

    @property
    def job(self) -> pb.Job:
        """A fresh parsed copy: changes to it do not change the record."""
        job = pb.Job.FromString(self.spec_blob)
        job.status.ParseFromString(self.status_blob)
        return job

    @property
    def spec_record(self) -> pb.Job:
        """The job without its status (spec, trace context, create time)."""
        return pb.Job.FromString(self.spec_blob)

    @property
    def status(self) -> pb.JobStatus:
        """A fresh parsed copy of the status: the caller owns it."""
        return pb.JobStatus.FromString(self.status_blob)

    @property
    def dispatch_state(self) -> sm.DispatchState:
        """What the state machine decides on, from the fields kept parsed (no parse)."""
        return sm.DispatchState(self.state, self.cluster, self.generation)

    def set_status(self, status: pb.JobStatus, revision: int, blob: bytes | None = None) -> None:
        self.status_blob = blob if blob is not None else status.SerializeToString()
        self.revision = revision
        self.state = status.state
        self.cluster = status.cluster
        self.generation = status.generation
        self.flavor = status.flavor
        self.priority = status.priority if status.HasField("priority") else None

    def request(self) -> JobRequest:
        """What placement and the queues need of the job, at its current priority."""
        request = convert.job_request(self.spec_record, self.seq)
        if self.priority is not None and self.priority != request.priority:
            request = dataclasses.replace(request, priority=self.priority)
        return request


@dataclass(slots=True)
class NewJob:
    """A job about to be stored; `record` is what the hub will hold once etcd has it."""

    record: JobRecord
    # The job as submitted (without status): what placement needs is built from it once the
    # job's revision, which orders it, is known.
    job: pb.Job
    request: JobRequest | None = None

    @classmethod
    def of(cls, job: pb.Job, status: pb.JobStatus, status_blob: bytes | None = None) -> NewJob:
        """From a job without status and its initial status (stored under a key of its own);
        `status_blob` is the status serialized, when the caller has it (a batch shares one)."""
        record = JobRecord(
            job.id,
            0,
            0,
            job.SerializeToString(),
            status_blob if status_blob is not None else status.SerializeToString(),
            status.state,
            status.cluster,
            status.generation,
            job.spec.queue,
            stored_idempotency_key(job.submitted_by, job.idempotency_key),
        )
        return cls(record, job)

    def stored_at(self, revision: int) -> JobRecord:
        """The record, created at `revision`. Idempotent: the watch may see the create before
        the submit's transaction answers, and the table may have moved the record on since."""
        if self.request is None:
            self.record.seq = self.record.revision = revision
            self.request = convert.job_request(self.job, revision)
        return self.record


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """A compare-and-swap of one status; `blob` is `status` serialized once, for etcd and the table."""

    job_id: str
    status: pb.JobStatus
    expected_revision: int
    blob: bytes

    @classmethod
    def of(cls, job_id: str, status: pb.JobStatus, expected_revision: int) -> StatusWrite:
        return cls(job_id, status, expected_revision, status.SerializeToString())


class JobTable:
    """The jobs, counted per (queue, state) and per cluster, with the pending queue.

    Every status write goes through `write`, under `fence`: the hub's authority to write,
    the leader key's revision while this replica leads and NOT_LEADING while it follows
    (NO_FENCE in single-hub tests). A write that finds its fence gone raises FenceLost,
    after calling `fence_lost` (the leadership steps down at once).
    """

    def __init__(self, store: JobStore, fence: Fence = NO_FENCE) -> None:
        self.store = store
        self.fence = fence
        self.fence_lost: Callable[[], None] = _nothing
        self.jobs: dict[str, JobRecord] = {}
        # Jobs waiting for a cluster, by queue and shape, and the quota admitted jobs hold:
        # what each placement round works on.
        self.queue = Queues()
        # Jobs per (queue, state) and active jobs per cluster, kept as statuses change.
        self.counts: Counter[tuple[str, int]] = Counter()
        self.active: Counter[str] = Counter()
        # Jobs whose create transaction is in flight, by id: the watch may see them first.
        self.creating: dict[str, NewJob] = {}
        # Set when placement has something new to look at: a job to place, capacity or clusters changed.
        self.wake = asyncio.Event()
        # Gang timeouts (gangs.py; see "backoff" below): PENDING jobs waiting out their backoff
        # (job id -> not before), a heap of their times, and the driver's dispatch listener.
        self.delayed: dict[str, float] = {}
        self._backoffs: list[tuple[float, str]] = []
        self.on_dispatch: Callable[[str, int, float], None] | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, record: JobRecord, request: JobRequest | None = None) -> JobRecord:
        """Hold a job (once): count it, and queue it when it waits for a cluster."""
        held = self.jobs.get(record.id)
        if held is not None:
            return held
        self.jobs[record.id] = record
        self._count(record, 1)
        if record.state == S.PENDING:
            if not self._held_back(record):
                self.queue.add(request or record.request())
        elif record.state in HOLDING:
            self._charge(record, request)
        return record

    def forget(self, record: JobRecord) -> None:
        if self.jobs.pop(record.id, None) is not None:
            self._count(record, -1)
            self.queue.discard(record.id)
            self.queue.release(record.id)
            self.delayed.pop(record.id, None)

    def _charge(self, record: JobRecord, request: JobRequest | None = None) -> None:
        """Count a job on a cluster against its queue's quota, unless it is already (the
        leader's own dispatches are charged when admitted; this is for what the table learns
        otherwise: on start, and another replica's dispatches)."""
        if self.queue.charged(record.id):
            return
        request = request or record.request()
        self.queue.charge(record.id, record.queue, record.flavor, demand(request))

    def _count(self, record: JobRecord, delta: int) -> None:
        self.counts[(record.queue, record.state)] += delta
        if record.cluster and record.state in HOLDING:
            self.active[record.cluster] += delta

    def merge(
        self, job_id: str, status: pb.JobStatus, revision: int, blob: bytes | None = None
    ) -> JobRecord | None:
        """Apply a status at `revision` unless the table already holds a newer one.

        A job that leaves PENDING leaves the pending queue; one that enters it again (requeued
        from a lost cluster, by this replica or another) joins it, and placement is woken.
        """
        record = self.jobs.get(job_id)
        if record is None:
            return None
        if revision > record.revision:
            self._count(record, -1)
            was_pending = record.state == S.PENDING
            was_holding = record.state in HOLDING
            generation = record.generation
            priority = record.priority
            record.set_status(status, revision, blob)
            self._count(record, 1)
            if was_pending and record.state != S.PENDING:
                self.queue.discard(job_id)
                self.delayed.pop(job_id, None)
            elif record.state == S.PENDING and not was_pending:
                # Joining the queue again gives its quota back (Queues.add).
                if not self._held_back(record, status):
                    self.queue.add(record.request())
                self.wake.set()
            elif was_pending and record.priority != priority and self.queue.discard(job_id):
                # Its priority changed while it waits: it takes its new place in its queue.
                self.queue.add(record.request())
                self.wake.set()
            if record.generation != generation and self.on_dispatch is not None:
                self._dispatched(record, status)
            if record.state in HOLDING:
                if not was_holding:
                    self._charge(record)
            elif was_holding and self.queue.release(job_id):
                self.wake.set()
        return record

    async def write(
        self, writes: Sequence[StatusWrite], fence: Fence | None = None
    ) -> list[JobRecord | None]:
        """Compare-and-swap statuses under the table's fence (or `fence`: NO_FENCE for a user's
        cancel, which any replica may write); each job's record as written, or None where
        another writer won (the record then holds what that writer wrote)."""
        revisions = await self._fenced(
            self.fence if fence is None else fence, lambda f: self.store.write_statuses(writes, f)
        )
        out: list[JobRecord | None] = []
        for write, revision in zip(writes, revisions, strict=True):
            if revision is None:
                fresh = await self.store.read_job(write.job_id)
                if fresh is not None:
                    blob = fresh.status_blob
                    self.merge(write.job_id, pb.JobStatus.FromString(blob), fresh.revision, blob)
                out.append(None)
            else:
                out.append(self.merge(write.job_id, write.status, revision, write.blob))
        return out

    async def delete(self, records: Sequence[JobRecord]) -> int:
        """Delete jobs from etcd and the table, each only if unchanged since the table read it."""
        done = await self._fenced(self.fence, lambda f: self.store.delete_jobs(records, f))
        deleted = 0
        for record, ok in zip(records, done, strict=True):
            if ok:
                self.forget(record)
                deleted += 1
        return deleted

    async def _fenced(self, fence: Fence, call: Callable[[Fence], Awaitable[T]]) -> T:
        """Run a store call under `fence`: refused here while not leading, and the leadership
        told at once when etcd finds the fence gone."""
        if fence is NOT_LEADING:
            raise FenceLost(fence)
        try:
            return await call(fence)
        except FenceLost:
            self.fence_lost()
            raise

    def requeue(self, request: JobRequest) -> None:
        """A job placed but not dispatched (its write lost a race) waits again."""
        self.queue.add(request)
        self.wake.set()

    def capacity_changed(self) -> None:
        """Capacity or clusters changed: shapes that fit nowhere get another look."""
        self.queue.unblock()
        self.wake.set()

    def pending_reason(self, job_id: str) -> str:
        if job_id in self.delayed:
            return self.backoff_reason(job_id)
        misfit = self.queue.misfit(job_id)
        return misfit.summary() if misfit is not None else "waiting for the next placement cycle"

    def job_out(self, record: JobRecord, job: pb.Job | None = None) -> pb.Job:
        """The job as the API shows it; `job` is the record's job when the caller holds it parsed."""
        job = job if job is not None else record.job
        job.revision = record.revision
        job.trace_id = telemetry.trace_id_of(job.trace_context)
        job.ClearField("trace_context")
        if job.status.state == S.PENDING:
            job.pending_reason = self.pending_reason(record.id)
        return job

    # ------------------------------------------------------------------ backoff (gang timeouts)
    # A job that gangs.py requeued after a gang timeout carries `not_before` in its status. Until
    # then it is PENDING everywhere (counts, lists, cancel) but kept out of the pending queue, in
    # `delayed`; the scheduler's loop calls `due` to let it in when its time comes.

    def _held_back(self, record: JobRecord, status: pb.JobStatus | None = None) -> bool:
        """Whether a job entering PENDING waits out a backoff first (then it is in `delayed`).

        Only a requeued job can have one, so a job never dispatched (generation 0: every submit)
        costs no parse."""
        if status is None:
            if record.generation == 0:
                return False
            status = record.status
        if not status.HasField("not_before"):
            return False
        at = status.not_before.seconds + status.not_before.nanos / 1e9
        self.delayed[record.id] = at
        heapq.heappush(self._backoffs, (at, record.id))
        return True

    def due(self, now: float) -> float | None:
        """Queue the delayed jobs whose backoff is over (and wake placement if any); when the next
        one is due, or None."""
        backoffs, delayed = self._backoffs, self.delayed
        moved = False
        while backoffs and backoffs[0][0] <= now:
            at, job_id = heapq.heappop(backoffs)
            if delayed.get(job_id) != at:
                continue  # it left PENDING meanwhile (cancelled, dispatched by another replica)
            del delayed[job_id]
            record = self.jobs[job_id]
            self.queue.add(record.request())
            moved = True
        while backoffs and delayed.get(backoffs[0][1]) != backoffs[0][0]:
            heapq.heappop(backoffs)
        if moved:
            self.wake.set()
        return backoffs[0][0] if backoffs else None

    def backoff_reason(self, job_id: str) -> str:
        record = self.jobs.get(job_id)
        until = datetime.fromtimestamp(self.delayed[job_id], UTC).isoformat(timespec="seconds")
        attempt = record.generation if record is not None else 0
        return f"backing off until {until} after a gang timeout (attempt {attempt})"

    def _dispatched(self, record: JobRecord, status: pb.JobStatus) -> None:
        """Tell the gang-timeout driver of a job that took a new generation and waits for its gang."""
        if record.state in (S.DISPATCHED, S.ADMITTED) and self.on_dispatch is not None:
            at = status.update_time.seconds + status.update_time.nanos / 1e9
            self.on_dispatch(record.id, record.generation, at)
