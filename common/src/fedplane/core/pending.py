"""The pending queue: jobs waiting for a cluster, grouped by shape so that a deep queue costs little.

Jobs of one shape (everything placement looks at except identity, priority and submission
order) are interchangeable to placement. Within a placement cycle capacity only shrinks, so
once a job of a shape fits nowhere, no later job of that shape fits in that cycle either:
the cycle stops looking at the shape at its first misfit. The shape then stays blocked
across cycles until capacity or the clusters change (`unblock`), so a cycle costs what its
placements cost, not what the queue holds: a million queued jobs of a few shapes are a few
heap operations per cycle. Jobs are otherwise taken exactly as `place_batch` takes them, by
priority, then submission order, then id; a job that fits nowhere does not hold up others.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from fedplane.core.model import ClusterView, JobRequest
from fedplane.core.placement import BatchPlacement, Decision, Weights, shape_of

# (-priority, seq, job id): heap order is placement order.
_Entry = tuple[int, int, str]


class Misfit(Protocol):
    """Why a shape's jobs wait: placement's Decision, or their queue's quota (quota.QuotaMisfit)."""

    def summary(self) -> str: ...


def _as(template: JobRequest, job_id: str, priority: int, seq: int) -> JobRequest:
    """The shape's template as the job `job_id` (built directly: dataclasses.replace costs
    several times more, once per job placed)."""
    t = template
    return JobRequest(
        id=job_id,
        pod_sets=t.pod_sets,
        priority=priority,
        seq=seq,
        cluster_selector=t.cluster_selector,
        tolerations=t.tolerations,
        groups=t.groups,
        strict_groups=t.strict_groups,
        datasets=t.datasets,
        queue=t.queue,
    )


@dataclass(slots=True)
class _Shape:
    # A job of this shape; any job's request is this one with its own id, priority and seq.
    template: JobRequest
    heap: list[_Entry] = field(default_factory=list)
    queued: int = 0
    # A job of the shape fit nowhere: skip the shape until unblock().
    blocked: bool = False
    # The last misfit (kept across unblock() until a job of the shape is placed): every
    # job of the shape is pending for its reasons.
    misfit: Misfit | None = None


class PendingQueue:
    def __init__(self) -> None:
        self._shapes: dict[Hashable, _Shape] = {}
        # job id -> (shape key, its heap entry); heap entries of removed jobs are skipped lazily.
        self._jobs: dict[str, tuple[Hashable, _Entry]] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def add(self, job: JobRequest) -> None:
        """Queue a job (again): a job already queued keeps its place."""
        if job.id in self._jobs:
            return
        key = shape_of(job)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape(replace(job, id="", priority=0, seq=0))
        entry = (-job.priority, job.seq, job.id)
        heapq.heappush(shape.heap, entry)
        shape.queued += 1
        self._jobs[job.id] = (key, entry)

    def discard(self, job_id: str) -> bool:
        """Take a job out (cancelled, or dispatched by another writer); False if it was not queued."""
        found = self._jobs.pop(job_id, None)
        if found is None:
            return False
        key = found[0]
        shape = self._shapes[key]
        shape.queued -= 1
        if shape.queued == 0:
            del self._shapes[key]
        return True

    def misfit(self, job_id: str) -> Misfit | None:
        """Why the job's shape fit nowhere in the last cycle that tried it, if it did not."""
        found = self._jobs.get(job_id)
        return self._shapes[found[0]].misfit if found else None

    def blocked_head(self) -> tuple[JobRequest, Misfit] | None:
        """The queue's first job (priority, then submission) when its shape is blocked, with
        why: the job a preemption would be for. O(shapes)."""
        best: tuple[_Entry, _Shape] | None = None
        for shape in self._shapes.values():
            entry = self._head(shape)
            if entry is not None and (best is None or entry < best[0]):
                best = (entry, shape)
        if best is None or not best[1].blocked or best[1].misfit is None:
            return None
        priority, seq, job_id = best[0]
        return _as(best[1].template, job_id, -priority, seq), best[1].misfit

    def position(self, job_id: str) -> int | None:
        """How many queued jobs go before this one (priority, then submission); None if not
        queued. It counts every job, so it is for explaining one job, not for a cycle."""
        found = self._jobs.get(job_id)
        if found is None:
            return None
        entry = found[1]
        return sum(1 for _, other in self._jobs.values() if other < entry)

    def unblock(self) -> None:
        """Capacity or clusters changed: every shape is worth another look."""
        for shape in self._shapes.values():
            shape.blocked = False

    @property
    def shapes(self) -> int:
        return len(self._shapes)

    def _head(self, shape: _Shape) -> _Entry | None:
        """The shape's first queued entry, dropping entries of jobs no longer queued."""
        heap = shape.heap
        while heap:
            entry = heap[0]
            found = self._jobs.get(entry[2])
            if found is not None and found[1] == entry:
                return entry
            heapq.heappop(heap)
        return None

    def cycle(
        self, clusters: Sequence[ClusterView], weights: Weights, limit: int
    ) -> list[tuple[JobRequest, Decision]]:
        """Place up to `limit` jobs: they leave the queue, and are returned with their decisions.

        A misfit blocks its shape (see `misfit`). Deductions are copy-on-write and each shape
        is screened once per cycle (`BatchPlacement`), so the caller's views are never modified.
        """
        batch = BatchPlacement(clusters, weights)
        cursor = self.cursor()
        placed: list[tuple[JobRequest, Decision]] = []
        while len(placed) < limit:
            head = cursor.peek()
            if head is None:
                break
            job, key = head
            decision = batch.place(job, key)
            if decision.cluster is None:
                cursor.block(decision)
                continue
            placed.append((job, decision))
            cursor.take()
        return placed

    def cursor(self, strict: bool = False) -> Cursor:
        """A walk over the queued jobs in placement order, for one cycle (see Cursor)."""
        return Cursor(self, strict)

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)


class Cursor:
    """One cycle's walk over a pending queue in placement order (priority, then submission),
    skipping blocked shapes: `peek` the next job, then either `take` it (placed: it leaves the
    queue) or `block` its shape with the reason it fits nowhere.

    Strict (a strict-FIFO queue): the walk stops at the first job whose shape is blocked,
    so that nothing behind the head overtakes it.
    """

    __slots__ = ("_heads", "_peeked", "_queue", "_strict")

    def __init__(self, queue: PendingQueue, strict: bool) -> None:
        self._queue = queue
        self._strict = strict
        heads: list[tuple[_Entry, int, Hashable]] = []
        for order, (key, shape) in enumerate(queue._shapes.items()):
            if strict or not shape.blocked:
                entry = queue._head(shape)
                if entry is not None:
                    heads.append((entry, order, key))
        heapq.heapify(heads)
        self._heads = heads
        self._peeked: tuple[JobRequest, _Entry, int, Hashable] | None = None

    def peek(self) -> tuple[JobRequest, Hashable] | None:
        """The next job and its shape's key, or None when the walk is over."""
        if self._peeked is not None:
            return self._peeked[0], self._peeked[3]
        queue = self._queue
        while self._heads:
            entry, order, key = self._heads[0]
            shape = queue._shapes.get(key)
            found = queue._jobs.get(entry[2])
            if shape is None or found is None or found[1] != entry:
                # The job left the queue since the walk began: go on with its shape's next.
                heapq.heappop(self._heads)
                if shape is not None:
                    self._push_head(shape, order, key)
                continue
            if shape.blocked:
                if self._strict:
                    self._heads.clear()
                    return None
                heapq.heappop(self._heads)
                continue
            priority, seq, job_id = entry
            job = _as(shape.template, job_id, -priority, seq)
            self._peeked = (job, entry, order, key)
            return job, key
        return None

    def take(self) -> JobRequest:
        """The peeked job was placed: it leaves the queue, and its shape's next job comes up."""
        assert self._peeked is not None, "take() without peek()"
        job, _, order, key = self._peeked
        self._peeked = None
        queue = self._queue
        shape = queue._shapes[key]
        shape.misfit = None
        heapq.heappop(self._heads)
        queue.discard(job.id)
        if shape.queued:
            self._push_head(shape, order, key)
        return job

    def block(self, why: Misfit) -> None:
        """The peeked job fits nowhere: block its shape (until `unblock`) with the reason."""
        assert self._peeked is not None, "block() without peek()"
        key = self._peeked[3]
        self._peeked = None
        shape = self._queue._shapes[key]
        shape.blocked = True
        shape.misfit = why
        if self._strict:
            self._heads.clear()
        else:
            heapq.heappop(self._heads)

    def _push_head(self, shape: _Shape, order: int, key: Hashable) -> None:
        following = self._queue._head(shape)
        if following is not None:
            heapq.heappush(self._heads, (following, order, key))
