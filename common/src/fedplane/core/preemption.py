"""Which running jobs to evict so that a pending gang can run: the preemption planner.

Pure and deterministic, like the rest of the core. Policy stays with the caller, which knows
the queues: `may_evict` says whether a running job may go for this candidate and why (same
queue and lower priority, a borrower its cohort reclaims, fair share, interruptible), and
`quota_fits_after` whether the candidate's queue has quota once given victims are gone. The
planner decides the rest: on which one cluster, and the fewest, lowest victims there.

A job is a gang and goes as a unit, and a plan never spans two clusters: capacity freed in one
cluster is no help to pods placed in another. On a cluster the victims are tried in order
(interruptible first, then lowest priority, then newest) and added until the gang fits on the
nodes with their pods' resources given back node by node, and the quota fits; then each
victim is taken out again, last first, if the gang still fits without it (Kueue does the
same), so no job is evicted for nothing. The fit is placement's own (`fit_gang`), on a
copy-on-write view (`ClusterView.with_free`), never a second packer.

No ping-pong: a PRIORITY eviction targets only a job of strictly lower priority than the
candidate, whatever `may_evict` says; so of two jobs, at most one may preempt the other for
priority. Fair share has its own rule for that (`fair_share_allows`, Kueue's
LessThanOrEqualToFinalShare), which the caller applies in `may_evict`.

Cost (100,000 running jobs over 1,000 clusters): a plan works on the running jobs of the
clusters that pass the candidate's filters and whose jobs together could free enough;
`may_evict` is asked about those jobs only. On a cluster, the whole pool evicted is tried
first, so a cluster that cannot work costs one fit, not one per victim. A lower bound on each
cluster's victim count (from resources alone) orders the clusters, and once a plan is found,
clusters that need more victims are not tried. `RunningIndex` keeps the per-job arithmetic
for the next plans of a cycle.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from fedplane.core.model import Assignment, ClusterView, JobRequest
from fedplane.core.placement import best_verdicts, filter_cluster, fit_gang


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job holding capacity on a cluster: what evicting it would give back, and its standing."""

    job_id: str
    queue: str
    cluster: str
    priority: int
    # Submission order (higher = newer).
    seq: int
    # Where its pods are: node, pod set, count.
    assignments: tuple[Assignment, ...]
    # Per pod set name, one pod's requests: what each of its pods gives back to its node.
    requests: Mapping[str, Mapping[str, int]]
    # The caller's clock, in seconds: running since.
    started_at: float
    # Not preemptible before started_at + min_run_seconds.
    min_run_seconds: float = 0.0
    # The interruptible tier: the first to go.
    interruptible: bool = False
    # Its queue holds it beyond its nominal quota: a target when the cohort reclaims.
    borrowing: bool = False


@dataclass(frozen=True, slots=True)
class Candidate:
    """The pending job that wants to run, and whether its priority class may preempt at all."""

    job: JobRequest
    queue: str
    may_preempt: bool = True


class Reason(enum.Enum):
    """Why a job is evicted; the value is the history's wording."""

    PRIORITY = "preempted by a higher-priority job of the same queue"
    RECLAIM = "its queue's cohort reclaimed borrowed quota"
    FAIR_SHARE = "preempted to bring the queues back to their fair shares"
    INTERRUPTIBLE = "interruptible jobs are the first to go"


@dataclass(frozen=True, slots=True)
class Eviction:
    """One victim of a plan: the job to requeue, where, why and for whom."""

    job_id: str
    cluster: str
    reason: Reason
    # The preemptor's job id.
    preemptor: str
    # The victim's priority and the preemptor's, and the preemptor's queue: for the message.
    priority: int = 0
    preemptor_priority: int = 0
    preemptor_queue: str = ""

    def message(self) -> str:
        """One line for the victim's history."""
        by = f"preempted by job {self.preemptor}"
        of_queue = f" of queue {self.preemptor_queue}" if self.preemptor_queue else ""
        where = f"to run on cluster {self.cluster}"
        if self.reason is Reason.PRIORITY:
            return f"{by} (priority {self.preemptor_priority} > {self.priority}) {where}"
        if self.reason is Reason.RECLAIM:
            return f"{by}{of_queue} {where}: that queue reclaimed quota this job's queue had borrowed"
        if self.reason is Reason.FAIR_SHARE:
            return f"{by}{of_queue} {where}: its queue was above its fair share"
        return f"{by}{of_queue} {where}: interruptible jobs are the first to go"


@dataclass(frozen=True, slots=True)
class Plan:
    """Evict these (all on `cluster`, in the order chosen) and the candidate fits there."""

    cluster: str
    evictions: tuple[Eviction, ...]


def strictly_lower(victim_priority: int, preemptor_priority: int) -> bool:
    """Whether a priority preemption is allowed: only of a strictly lower priority.

    Equal priorities never preempt each other, so two jobs cannot take turns evicting
    each other for priority.
    """
    return victim_priority < preemptor_priority


def fair_share_allows(
    preemptor_share_after: float, victim_queue_share_before: float, victim_queue_share_after: float
) -> bool:
    """Kueue's LessThanOrEqualToFinalShare (KEP-1714 rule S2-a) for a fair-share eviction.

    Allowed only if the preemptor's queue, with the new job, has a share no larger than the
    victim's queue without the victim: the preemption may not turn the victim's queue into
    the one below its share, which would then preempt back. The share before does not enter
    this rule (it is the other strategy's, `less_than_initial_share`); it is taken so that
    callers can pass both and switch rules.
    """
    del victim_queue_share_before
    return preemptor_share_after <= victim_queue_share_after


def less_than_initial_share(preemptor_share_after: float, victim_queue_share_before: float) -> bool:
    """Kueue's LessThanInitialShare (rule S2-b): the preemptor's share with the new job stays
    strictly below the victim queue's share before the preemption."""
    return preemptor_share_after < victim_queue_share_before


class RunningIndex:
    """The running jobs by cluster, and what each gives back where: shared by many plans.

    `plan` takes either this or a plain sequence (from which it builds one on each call). A
    caller planning for several candidates against the same running jobs builds it once: the
    jobs are grouped by cluster here, and what a cluster's jobs hold is worked out the first
    time a plan looks at that cluster, then kept, so a plan costs the clusters it looks at.
    Treat the jobs as fixed once indexed.

    With `previous`, the index of an earlier round, what a job gives back node by node is
    taken from it for every job that is the very same RunningJob object (the caller keeps
    one per job until it changes), so that a round over 100,000 running jobs does not work
    them all out again.
    """

    __slots__ = ("_by_job", "_holdings", "by_cluster")

    def __init__(self, running: Iterable[RunningJob], previous: RunningIndex | None = None) -> None:
        by_cluster: dict[str, list[RunningJob]] = {}
        # Carried over from `previous`: only the jobs still running, unchanged.
        kept: dict[str, _Holding] = {}
        earlier: dict[str, _Holding] = previous._by_job if previous is not None else {}
        for job in running:
            by_cluster.setdefault(job.cluster, []).append(job)
            holding = earlier.get(job.job_id)
            if holding is not None and holding.job is job:
                kept[job.job_id] = holding
        self.by_cluster: Mapping[str, Sequence[RunningJob]] = by_cluster
        self._holdings: dict[str, tuple[list[_Holding], dict[str, int]]] = {}
        self._by_job: dict[str, _Holding] = kept

    def held(self, cluster: str) -> Mapping[str, int]:
        """What the cluster's running jobs hold together, by resource."""
        return self._of(cluster)[1]

    def _of(self, cluster: str) -> tuple[list[_Holding], dict[str, int]]:
        """The cluster's jobs' holdings and their sum, worked out on first use."""
        cached = self._holdings.get(cluster)
        if cached is None:
            known = self._by_job
            holdings = []
            for job in self.by_cluster.get(cluster, ()):
                holding = known.get(job.job_id)
                if holding is None or holding.job is not job:
                    holding = known[job.job_id] = _Holding.of(job)
                holdings.append(holding)
            total: dict[str, int] = {}
            for holding in holdings:
                for resource, amount in holding.usage.items():
                    total[resource] = total.get(resource, 0) + amount
            cached = self._holdings[cluster] = (holdings, total)
        return cached


class _Holding(NamedTuple):
    """A running job and what evicting it gives back: in all, and node by node."""

    job: RunningJob
    usage: Mapping[str, int]
    per_node: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]
    # Its place in the order victims are tried (see _order).
    order: tuple[bool, int, int, str]

    @classmethod
    def of(cls, job: RunningJob) -> _Holding:
        nodes: dict[str, dict[str, int]] = {}
        usage: dict[str, int] = {}
        for assignment in job.assignments:
            node = nodes.setdefault(assignment.node, {})
            for resource, amount in job.requests.get(assignment.pod_set, {}).items():
                node[resource] = node.get(resource, 0) + amount * assignment.count
                usage[resource] = usage.get(resource, 0) + amount * assignment.count
        per_node = tuple((name, tuple(amounts.items())) for name, amounts in nodes.items())
        return cls(job, usage, per_node, _order(job))


def _no_limit(queue: str) -> int:
    return 1_000_000


def plan(
    candidate: Candidate,
    clusters: Sequence[ClusterView],
    running: Sequence[RunningJob] | RunningIndex,
    may_evict: Callable[[RunningJob], Reason | None],
    quota_fits_after: Callable[[Sequence[RunningJob]], bool],
    now: float,
    budget: Callable[[str], int] = _no_limit,
) -> Plan | None:
    """The evictions on one cluster that let the candidate run, or None.

    None when the candidate may not preempt, when it fits somewhere as things are (nodes and
    quota: the caller places it normally), when no cluster works, or when the best plan
    needs more evictions than `budget(candidate.queue)` allows now. Among clusters, the plan
    with the fewest victims wins, then the lowest highest victim priority, then the name.
    `clusters` are the current views (reported free capacity minus capacity in flight); they
    are not modified (placement may cache on them, as it does).
    """
    if not candidate.may_preempt:
        return None
    job = candidate.job
    if quota_fits_after(()) and _fits_somewhere(job, clusters):
        return None
    limit = budget(candidate.queue)
    if limit < 1:
        return None
    index = running if isinstance(running, RunningIndex) else RunningIndex(running)
    need = _required(job)
    options: list[tuple[int, str, ClusterView, list[_Victim]]] = []
    for view in clusters:
        if not index.by_cluster.get(view.name) or filter_cluster(job, view):
            continue
        holdings, held = index._of(view.name)
        room = view.room()
        if not _reachable(need, room, held):
            continue
        pool = _pool(candidate, holdings, may_evict, now)
        if not pool:
            continue
        fewest = _fewest_victims(need, room, pool)
        if fewest is None or fewest > limit:
            continue
        options.append((fewest, view.name, view, pool))
    options.sort(key=lambda option: (option[0], option[1]))
    best: tuple[int, int, str] | None = None
    chosen: list[_Victim] = []
    for fewest, name, view, pool in options:
        if best is not None and fewest > best[0]:
            break  # no later cluster can do with as few victims
        victims = _plan_on(job, view, pool, need, quota_fits_after)
        if victims is None:
            continue
        key = (len(victims), max(v.job.priority for v in victims), name)
        if best is None or key < best:
            best, chosen = key, victims
    if best is None or len(chosen) > limit:
        return None
    return Plan(
        best[2],
        tuple(
            Eviction(v.job.job_id, best[2], v.reason, job.id, v.job.priority, job.priority, candidate.queue)
            for v in chosen
        ),
    )


class _Victim(NamedTuple):
    # First, so that victims sort by it (it ends with the job id: no two are equal).
    order: tuple[bool, int, int, str]
    job: RunningJob
    reason: Reason
    holding: _Holding


def _order(job: RunningJob) -> tuple[bool, int, int, str]:
    """Interruptible first, then the lowest priority, then the newest; the id breaks ties."""
    return (not job.interruptible, job.priority, -job.seq, job.job_id)


def _pool(
    candidate: Candidate,
    holdings: Sequence[_Holding],
    may_evict: Callable[[RunningJob], Reason | None],
    now: float,
) -> list[_Victim]:
    """The cluster's jobs that may go for the candidate, in the order they are tried."""
    priority = candidate.job.priority
    pool: list[_Victim] = []
    for holding in holdings:
        running = holding.job
        if now < running.started_at + running.min_run_seconds:
            continue
        reason = may_evict(running)
        if reason is None:
            continue
        if reason is Reason.PRIORITY and not strictly_lower(running.priority, priority):
            continue  # no ping-pong, whatever the policy says
        pool.append(_Victim(holding.order, running, reason, holding))
    pool.sort()
    return pool


def _plan_on(
    job: JobRequest,
    view: ClusterView,
    pool: list[_Victim],
    need: Mapping[str, int],
    quota_fits_after: Callable[[Sequence[RunningJob]], bool],
) -> list[_Victim] | None:
    """The victims on this cluster: added in order until the gang and its quota fit, then pruned.

    The whole pool is tried first, so a cluster that cannot work costs one fit, not one per
    victim. The pruning repeats until a pass drops nothing, so that every victim kept is
    needed by the final set (placement's best-fit packing is not monotone in every case).
    """

    def works(victims: list[_Victim], given_back: ClusterView) -> bool:
        return _fits(job, given_back, need) and quota_fits_after(tuple(v.job for v in victims))

    if not works(pool, _given_back(view, pool)):
        return None
    victims: list[_Victim] = []
    current = view
    for victim in pool:
        victims.append(victim)
        current = _given_back(current, (victim,))
        if works(victims, current):
            break
    else:
        return None  # unreachable: the whole pool is the last prefix, and it works
    dropped = True
    while dropped and len(victims) > 1:
        dropped = False
        for i in range(len(victims) - 1, -1, -1):
            without = victims[:i] + victims[i + 1 :]
            if without and works(without, _given_back(view, without)):
                victims = without
                dropped = True
    return victims


def _given_back(view: ClusterView, victims: Iterable[_Victim]) -> ClusterView:
    """The view with the victims' pods' requests returned to their nodes (copy-on-write)."""
    position = view.index().position
    changes: dict[int, dict[str, int]] = {}
    nodes = view.nodes
    for victim in victims:
        for node, amounts in victim.holding.per_node:
            i = position.get(node)
            if i is None:
                continue  # a node the view no longer has
            free = changes.get(i)
            if free is None:
                free = changes[i] = dict(nodes[i].free)
            for resource, amount in amounts:
                free[resource] = free.get(resource, 0) + amount
    return view.with_free(changes) if changes else view


def _fits(job: JobRequest, view: ClusterView, need: Mapping[str, int]) -> bool:
    """Whether the gang fits on the view's nodes: the cheap proof of a misfit first, then placement's."""
    room = view.room()
    for resource, amount in need.items():
        if room.get(resource, 0) < amount:
            return False
    return not fit_gang(job, view)[1]


def _fits_somewhere(job: JobRequest, clusters: Sequence[ClusterView]) -> bool:
    verdicts = best_verdicts(job, clusters)
    return bool(verdicts) and verdicts[0].feasible


def _required(job: JobRequest) -> dict[str, int]:
    """The resources the gang's required pods (min_count, or count) need, the positive ones."""
    need: dict[str, int] = {}
    for pod_set in job.pod_sets:
        pods = pod_set.min_count or pod_set.count
        for resource, amount in pod_set.requests.items():
            if amount > 0 and pods > 0:
                need[resource] = need.get(resource, 0) + amount * pods
    return need


def _reachable(need: Mapping[str, int], room: Mapping[str, int], held: Mapping[str, int]) -> bool:
    """Whether evicting every running job could give enough room, resource by resource."""
    return all(room.get(r, 0) + held.get(r, 0) >= amount for r, amount in need.items())


def _fewest_victims(need: Mapping[str, int], room: Mapping[str, int], pool: list[_Victim]) -> int | None:
    """At least how many of the pool must go before the gang can fit (at least one), or None
    if all of them together do not free enough: the room grows by at most what a victim holds."""
    fewest = 1
    for resource, amount in need.items():
        short = amount - room.get(resource, 0)
        if short <= 0:
            continue
        freed = 0
        count = 0
        for held in sorted((v.holding.usage.get(resource, 0) for v in pool), reverse=True):
            if held <= 0:
                break
            freed += held
            count += 1
            if freed >= short:
                break
        if freed < short:
            return None
        fewest = max(fewest, count)
    return fewest
