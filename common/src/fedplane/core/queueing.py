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

from fedplane.core import fairshare, preemption
from fedplane.core.model import ClusterView, JobRequest
from fedplane.core.pending import Cursor, Misfit, PendingQueue
from fedplane.core.placement import BatchPlacement, Decision, Weights
from fedplane.core.queues import (
    QueueConfig,
    QueueSpec,
    QueueStatus,
    ReclaimWithinCohort,
    Strategy,
    WithinQueue,
    demand_of,
)
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


@dataclass(frozen=True, slots=True)
class Unplaced:
    """Why a shape's jobs fit no cluster, as placement summed it up (explain has the verdicts)."""

    reason: str

    def summary(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True)
class Held:
    """A held queue's jobs wait for its release."""

    queue: str

    def summary(self) -> str:
        return f"queue {self.queue} is held: no new admissions until it is released"


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
        """Why the job waits after the last cycle that looked at it: its queue is held, or its
        quota, or placement."""
        queue = self._queue_of.get(job_id)
        if queue is None:
            return None
        spec = self.config.queues.get(queue)
        if spec is not None and spec.held:
            return Held(queue)
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
        # Each nominated head's demand and flavor, with how many admissions the cycle had made
        # then: the quota tree changes only by an admission, so an answer is current until one.
        nominated: dict[str, tuple[dict[str, int], FlavorChoice, int]] = {}
        admitted: list[Admitted] = []

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
                nominated[name] = (wanted, choice, len(admitted))
                return

        for name in cursors:
            nominate(name)
        while heads and len(admitted) < limit:
            name = heapq.heappop(heads)[3]
            cursor = cursors[name]
            head = cursor.peek()
            assert head is not None
            job, key = head
            wanted, nominated_choice, as_of = nominated[name]
            choice: FlavorChoice | QuotaMisfit = nominated_choice
            if as_of != len(admitted):
                # Another admission may have taken the quota since this head was nominated.
                choice = self.tree.assign(name, wanted)
            if isinstance(choice, QuotaMisfit):
                cursor.block(choice)
            else:
                placed, choice, why = self._place_in_some_flavor(batch, job, key, choice, wanted)
                if placed.cluster is None:
                    # Only its summary: a decision holds a verdict per cluster, and every blocked
                    # shape of every queue keeping one made the collector the cycle's main cost.
                    cursor.block(Unplaced(why))
                else:
                    cursor.take()
                    self._queue_of.pop(job.id, None)
                    self.charge(job.id, name, choice.flavor, wanted)
                    admitted.append(Admitted(job, placed, choice.flavor))
            nominate(name)
        for name in [name for name, pending in self._pending.items() if not len(pending)]:
            del self._pending[name]
        return admitted

    def _place_in_some_flavor(
        self,
        batch: BatchPlacement,
        job: JobRequest,
        key: Hashable,
        choice: FlavorChoice,
        wanted: Mapping[str, int],
    ) -> tuple[Decision, FlavorChoice, str]:
        """Place `job` in the flavor its quota chose, and when that flavor's clusters have no
        room, in the next flavor whose quota takes it, and so on: a federation's flavors are
        often whole clusters, and one full region should not hold a job another could run.
        The decision, the flavor, and (not placed) why."""
        tried: list[str] = []
        while True:
            placed = self._place(batch, job, key, choice)
            if placed.cluster is not None or not choice.flavor:
                return placed, choice, "" if placed.cluster is not None else placed.summary()
            tried.append(choice.flavor)
            following = self.tree.assign(job.queue, wanted, tried)
            if isinstance(following, QuotaMisfit) or not following.flavor:
                why = placed.summary()
                if len(tried) > 1:
                    why = f"no room in flavors {', '.join(tried)}; in {tried[-1]}: {why}"
                return placed, choice, why
            choice = following

    def _place(self, batch: BatchPlacement, job: JobRequest, key: Hashable, choice: FlavorChoice) -> Decision:
        """Place `job` restricted to its flavor's clusters, GPU product and node labels."""
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
        if flavor.node_labels:
            nodes = tuple(sorted(flavor.node_labels.items()))
            pod_sets = tuple(
                replace(p, node_selector=tuple(sorted({*p.node_selector, *nodes}))) for p in pod_sets
            )
        constrained = replace(job, cluster_selector=selector, pod_sets=pod_sets)
        return batch.place(constrained, (key, choice.flavor))

    # ------------------------------------------------------------------ preemption
    def blocked_heads(self) -> list[JobRequest]:
        """Each queue's first job when it waits (quota or placement), for queues that are not
        held: the jobs a preemption round considers, highest priority first."""
        heads = []
        for name, pending in self._pending.items():
            spec = self.config.queues.get(name)
            if spec is None or spec.held:
                continue
            blocked = pending.blocked_head()
            if blocked is not None:
                heads.append(blocked[0])
        heads.sort(key=lambda j: (-j.priority, j.seq, j.id))
        return heads

    def preempt(
        self,
        job: JobRequest,
        clusters: Sequence[ClusterView],
        running: preemption.RunningIndex,
        now: float,
        *,
        may_preempt: bool = True,
        interruptible: bool = False,
        budget: int = 1_000_000,
    ) -> preemption.Plan | None:
        """Whom to evict, on one cluster, so that `job` (a waiting queue's head) runs: the
        queue's preemption policy decides who may go (`_victim_reason`), the quota tree whether
        the job's quota fits once they are gone, and `preemption.plan` the fewest and lowest.

        `interruptible_jobs`: running jobs of the interruptible tier, whom any job that is not
        interruptible itself may evict."""
        spec = self.config.queues.get(job.queue)
        if spec is None or not may_preempt:
            return None
        wanted = demand(job)
        within_nominal = self._within_nominal(spec, wanted)
        shares: dict[str, tuple[float, float]] = {}
        capacity = _capacity(clusters) if spec.preemption.fair_share else {}

        def may_evict(victim: preemption.RunningJob) -> preemption.Reason | None:
            if victim.job_id == job.id:
                return None
            if victim.interruptible and not interruptible:
                return preemption.Reason.INTERRUPTIBLE
            return self._victim_reason(spec, job, wanted, within_nominal, victim, capacity, shares)

        def quota_fits_after(victims: Sequence[preemption.RunningJob]) -> bool:
            held = [self._charges[v.job_id] for v in victims if v.job_id in self._charges]
            for charge in held:
                self.tree.release(charge.queue, charge.flavor, charge.demand)
            try:
                return not isinstance(self.tree.assign(job.queue, wanted), QuotaMisfit)
            finally:
                for charge in held:
                    self.tree.charge(charge.queue, charge.flavor, charge.demand)

        candidate = preemption.Candidate(job, job.queue, may_preempt)
        return preemption.plan(
            candidate, clusters, running, may_evict, quota_fits_after, now, lambda _queue: budget
        )

    def _victim_reason(
        self,
        spec: QueueSpec,
        job: JobRequest,
        wanted: Mapping[str, int],
        within_nominal: bool,
        victim: preemption.RunningJob,
        capacity: Mapping[str, int],
        shares: dict[str, tuple[float, float]],
    ) -> preemption.Reason | None:
        """Kueue's rules: within the queue, a lower priority; across the cohort, only jobs their
        queue holds beyond its nominal quota, reclaimed by a queue that would stay within its
        own, or (fair sharing) taken from a queue whose share stays at least the preemptor's."""
        policy = spec.preemption
        if victim.queue == job.queue:
            if policy.within_queue == WithinQueue.LOWER_PRIORITY and victim.priority < job.priority:
                return preemption.Reason.PRIORITY
            return None
        charge = self._charges.get(victim.job_id)
        if charge is None or not self._same_tree(job.queue, victim.queue):
            return None
        if not self._borrowing(charge):
            return None
        reclaim = policy.reclaim_within_cohort
        if within_nominal and (
            reclaim == ReclaimWithinCohort.ANY
            or (reclaim == ReclaimWithinCohort.LOWER_PRIORITY and victim.priority < job.priority)
        ):
            return preemption.Reason.RECLAIM
        if policy.fair_share:
            mine, theirs_after = shares.get(victim.queue) or self._shares(job, wanted, charge, capacity)
            shares[victim.queue] = (mine, theirs_after)
            if preemption.fair_share_allows(mine, 0.0, theirs_after):
                return preemption.Reason.FAIR_SHARE
        return None

    def _within_nominal(self, spec: QueueSpec, wanted: Mapping[str, int]) -> bool:
        """Whether some flavor of the queue takes `wanted` within the queue's own nominal quota."""
        for flavor in spec.quotas:
            named = [r for r in flavor.resources if wanted.get(r, 0) > 0]
            if named and all(
                self.tree.usage(spec.name, flavor.flavor, r) + wanted[r] <= flavor.resources[r].nominal
                for r in named
            ):
                return True
        return False

    def _borrowing(self, charge: _Charge) -> bool:
        return any(self.tree.borrowed(charge.queue, charge.flavor, r) > 0 for r in charge.demand)

    def _same_tree(self, a: str, b: str) -> bool:
        path_a, path_b = self._path(a), self._path(b)
        return len(path_a) > 1 and len(path_b) > 1 and path_a[0] == path_b[0]

    def _shares(
        self, job: JobRequest, wanted: Mapping[str, int], victim: _Charge, capacity: Mapping[str, int]
    ) -> tuple[float, float]:
        """The preemptor's queue's share with the job, and the victim's queue's without one
        such victim (Kueue's LessThanOrEqualToFinalShare compares these)."""
        choice = self.tree.assign(job.queue, wanted)
        flavor = choice.flavor if isinstance(choice, FlavorChoice) else victim.flavor
        mine = fairshare.share(self.tree, job.queue, capacity, (flavor, wanted))
        self.tree.release(victim.queue, victim.flavor, victim.demand)
        try:
            theirs = fairshare.share(self.tree, victim.queue, capacity)
        finally:
            self.tree.charge(victim.queue, victim.flavor, victim.demand)
        return mine, theirs

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
