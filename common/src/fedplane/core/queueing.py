"""The queueing cycle: which job goes next, from which queue and in which flavor, before
placement decides where.

Each queue keeps its own pending jobs (`PendingQueue`, by shape); the quota its admitted jobs
hold is charged to a `QuotaTree` (quota.py), federation-wide, whatever cluster they run in.
A cycle has the phases Kueue's scheduler names:

- **nominate**: each queue that is not held offers its head (highest priority, then first
  submitted), with the flavor its quota gives it (flavors in the queue's order; see
  `QuotaTree.assign`). A head its quota cannot take is blocked with the shortfall as its
  reason; a strict-FIFO queue then offers nothing more, a best-effort one its next job.
- **order**: among the queues' heads, the next comes from the queue whose hierarchical
  weighted dominant share after adding it is lowest (fairshare.py), then the higher priority,
  then the earlier submission.
- **admit**: the head is placed with its flavor's constraints (the flavor's cluster labels,
  its GPU product); placed, its quota is charged at once, so the rest of the cycle sees it; a
  head that fits no cluster blocks its shape with placement's reasons.

The table (hub/table.py) charges jobs it finds holding quota (on start, on another replica's
dispatch) and releases them when they leave their cluster, through `charge` and `release`.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from fedplane.core import fairshare
from fedplane.core.model import ClusterView, JobRequest
from fedplane.core.pending import Cursor, Misfit, PendingQueue
from fedplane.core.placement import BatchPlacement, Decision, Weights
from fedplane.core.queues import QueueConfig, QueueSpec, QueueStatus, Strategy, demand_of
from fedplane.core.quota import FlavorChoice, QuotaMisfit, QuotaTree


@dataclass(frozen=True, slots=True)
class Admitted:
    """A job the cycle admitted: where placement put it, and the flavor whose quota it holds."""

    job: JobRequest
    decision: Decision
    flavor: str


@dataclass(frozen=True, slots=True)
class _Charge:
    queue: str
    flavor: str
    demand: Mapping[str, int]


def demand(job: JobRequest) -> dict[str, int]:
    """The job's whole gang request, by resource (every pod set at its full count)."""
    return demand_of(tuple((p.count, p.requests) for p in job.pod_sets))


class Queues:
    """Every queue's pending jobs and the quota its admitted jobs hold.

    A job naming a queue the configuration does not hold waits in an implicit queue with no
    quota (the hub refuses such jobs unless it runs with `implicit_queues`).
    """

    def __init__(self, config: QueueConfig | None = None) -> None:
        self.config = config if config is not None else QueueConfig()
        self.tree = QuotaTree.build(self.config)
        self._pending: dict[str, PendingQueue] = {}
        # Pending job id -> its queue.
        self._queue_of: dict[str, str] = {}
        # Admitted job id -> the quota it holds.
        self._charges: dict[str, _Charge] = {}
        self._admitted: Counter[str] = Counter()

    # ------------------------------------------------------------------ pending jobs
    def __len__(self) -> int:
        return len(self._queue_of)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._queue_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._queue_of)

    @property
    def shapes(self) -> int:
        return sum(p.shapes for p in self._pending.values())

    def add(self, job: JobRequest) -> None:
        """Queue a job (again): a job already queued keeps its place; one that held quota
        (requeued from its cluster) gives it back."""
        if job.id in self._queue_of:
            return
        self.release(job.id)
        pending = self._pending.get(job.queue)
        if pending is None:
            pending = self._pending[job.queue] = PendingQueue()
        pending.add(job)
        self._queue_of[job.id] = job.queue

    def discard(self, job_id: str) -> bool:
        """Take a job out (cancelled, or dispatched by another writer); False if it was not queued."""
        queue = self._queue_of.pop(job_id, None)
        if queue is None:
            return False
        pending = self._pending[queue]
        pending.discard(job_id)
        if not len(pending):
            del self._pending[queue]
        return True

    def misfit(self, job_id: str) -> Misfit | None:
        """Why the job waits after the last cycle that looked at it: its quota or placement."""
        queue = self._queue_of.get(job_id)
        if queue is None:
            return None
        return self._pending[queue].misfit(job_id)

    def queue_of(self, job_id: str) -> str | None:
        return self._queue_of.get(job_id)

    def position(self, job_id: str) -> int | None:
        """How many jobs of its queue go before it (priority, then submission), or None."""
        queue = self._queue_of.get(job_id)
        if queue is None:
            return None
        return self._pending[queue].position(job_id)

    def unblock(self) -> None:
        """Capacity, clusters or quota changed: every waiting shape is worth another look."""
        for pending in self._pending.values():
            pending.unblock()

    # ------------------------------------------------------------------ quota
    def charge(self, job_id: str, queue: str, flavor: str, demand: Mapping[str, int]) -> None:
        """The job holds quota from now on (once: charging it again changes nothing)."""
        if job_id in self._charges:
            return
        self._charges[job_id] = _Charge(queue, flavor, demand)
        self.tree.charge(queue, flavor, demand)
        self._admitted[queue] += 1

    def release(self, job_id: str) -> bool:
        """The job no longer holds quota (finished, requeued, deleted); False if it held none.

        Freed quota is worth another look for every waiting shape, as freed capacity is."""
        held = self._charges.pop(job_id, None)
        if held is None:
            return False
        self.tree.release(held.queue, held.flavor, held.demand)
        self._admitted[held.queue] -= 1
        if not self._admitted[held.queue]:
            del self._admitted[held.queue]
        self.unblock()
        return True

    def charged(self, job_id: str) -> bool:
        return job_id in self._charges

    def configure(self, config: QueueConfig) -> None:
        """A new configuration: the quota tree is rebuilt with every admitted job's charge."""
        self.config = config
        self.tree = QuotaTree.build(config)
        for held in self._charges.values():
            self.tree.charge(held.queue, held.flavor, held.demand)
        self.unblock()

    # ------------------------------------------------------------------ the cycle
    def cycle(self, clusters: Sequence[ClusterView], weights: Weights, limit: int) -> list[Admitted]:
        """Admit up to `limit` jobs: nominate, order, admit (see the module's docstring).

        Admitted jobs leave the pending queues and hold their quota at once; the caller's
        views are never modified (placement's deductions are copy-on-write).
        """
        batch = BatchPlacement(clusters, weights)
        cursors: dict[str, Cursor] = {}
        for name, pending in self._pending.items():
            spec = self.config.queues.get(name)
            if spec is not None and spec.held:
                continue
            cursors[name] = pending.cursor(strict=spec is not None and spec.strategy == Strategy.STRICT_FIFO)
        contended = len(cursors) > 1
        capacity = _capacity(clusters) if contended else {}
        heads: list[tuple[tuple[float, ...], int, int, str]] = []

        def nominate(name: str) -> None:
            cursor = cursors[name]
            while True:
                head = cursor.peek()
                if head is None:
                    return
                job = head[0]
                wanted = demand(job)
                choice = self.tree.assign(name, wanted)
                if isinstance(choice, QuotaMisfit):
                    cursor.block(choice)
                    continue
                share = (
                    fairshare.ordering_key(self.tree, name, capacity, choice.flavor, wanted)
                    if contended
                    else ()
                )
                heapq.heappush(heads, (share, -job.priority, job.seq, name))
                return

        for name in cursors:
            nominate(name)
        admitted: list[Admitted] = []
        while heads and len(admitted) < limit:
            name = heapq.heappop(heads)[3]
            cursor = cursors[name]
            head = cursor.peek()
            assert head is not None
            job, key = head
            wanted = demand(job)
            # Another queue's admission may have taken the quota since this head was nominated.
            choice = self.tree.assign(name, wanted)
            if isinstance(choice, QuotaMisfit):
                cursor.block(choice)
            else:
                placed = self._place(batch, job, key, choice)
                if placed.cluster is None:
                    cursor.block(placed)
                else:
                    cursor.take()
                    self._queue_of.pop(job.id, None)
                    self.charge(job.id, name, choice.flavor, wanted)
                    admitted.append(Admitted(job, placed, choice.flavor))
            nominate(name)
        for name in [name for name, pending in self._pending.items() if not len(pending)]:
            del self._pending[name]
        return admitted

    def _place(self, batch: BatchPlacement, job: JobRequest, key: Hashable, choice: FlavorChoice) -> Decision:
        """Place `job` restricted to its flavor's clusters and GPU product."""
        flavor = self.config.flavors.get(choice.flavor) if choice.flavor else None
        if flavor is None:
            return batch.place(job, key)
        selector = {**job.cluster_selector, **flavor.cluster_labels}
        pod_sets = job.pod_sets
        if flavor.gpu_type:
            pod_sets = tuple(
                replace(p, gpu_type=flavor.gpu_type) if not p.gpu_type and _wants_gpu(p.requests) else p
                for p in pod_sets
            )
        constrained = replace(job, cluster_selector=selector, pod_sets=pod_sets)
        return batch.place(constrained, (key, choice.flavor))

    # ------------------------------------------------------------------ the queue view
    def report(self) -> list[QueueStatus]:
        """Every queue and cohort with its usage and quota, pending and admitted jobs.

        Queues the configuration does not hold but jobs name (implicit queues) are listed too."""
        rows = []
        pending_in: Counter[str] = Counter()
        admitted_in: Counter[str] = Counter()
        for name, pending in self._pending.items():
            for node in self._path(name):
                pending_in[node] += len(pending)
        for name, count in self._admitted.items():
            for node in self._path(name):
                admitted_in[node] += count
        for status in self.tree.report():
            spec: QueueSpec | None = self.config.queues.get(status.name) if status.kind == "queue" else None
            rows.append(
                replace(
                    status,
                    pending=pending_in[status.name],
                    admitted=admitted_in[status.name],
                    held=spec is not None and spec.held,
                )
            )
        listed = {row.name for row in rows if row.kind == "queue"}
        for name in sorted({*self._pending, *self._admitted} - listed):
            rows.append(QueueStatus(name, "queue", "", (), 0.0, pending_in[name], admitted_in[name]))
        return rows

    def _path(self, queue: str) -> tuple[str, ...]:
        return self.tree.path(queue) if queue in self.config.queues else (queue,)


def _wants_gpu(requests: Mapping[str, int]) -> bool:
    return any(resource.endswith("/gpu") and amount > 0 for resource, amount in requests.items())


def _capacity(clusters: Sequence[ClusterView]) -> dict[str, int]:
    """The federation's allocatable capacity by resource: fair share's denominators."""
    total: dict[str, int] = {}
    for view in clusters:
        for resource, amount in view.total("allocatable").items():
            total[resource] = total.get(resource, 0) + amount
    return total
