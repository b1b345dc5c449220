"""Queues, cohorts, resource flavors and priority classes: what governs *which* job runs next
and whether it may run at all, as plain values.

A **queue** belongs to at most one **cohort**; cohorts form a tree (an organisation, its
departments, their teams). Quotas are per resource **flavor** (a kind of capacity, such as
`gpu-h100` or `cpu`, that maps to cluster labels and a GPU product) and per resource, each with
a nominal amount, a borrowing limit and a lending limit, in Kueue's sense: unused nominal quota
is lent up the tree and across it within those limits (`quota.py` does the arithmetic).
A resource that none of a queue's flavors name is not limited by the queue.

These types are what the hub stores (as protobuf, converted at the shell) and what the
queueing cycle (`queueing.py`), the quota arithmetic (`quota.py`), fair sharing
(`fairshare.py`) and preemption (`preemption.py`) take.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# A queue's or cohort's amount of one resource of one flavor: (flavor, resource).
FlavorResource = tuple[str, str]


class Strategy(enum.IntEnum):
    """How a queue orders its own jobs when its head cannot be admitted."""

    # A head that does not fit (quota or placement) blocks the queue until it fits.
    STRICT_FIFO = 1
    # A head that does not fit is passed over; the next job that fits goes (the default).
    BEST_EFFORT_FIFO = 2


class WhenCanBorrow(enum.IntEnum):
    """Kueue's flavor fungibility: what a queue does when a flavor fits only by borrowing."""

    # Take the first flavor that fits, borrowing if it must (the default).
    BORROW = 1
    # Try the later flavors first for one that fits within the queue's own nominal quota.
    TRY_NEXT_FLAVOR = 2


class WithinQueue(enum.IntEnum):
    """Whom a pending job may preempt in its own queue."""

    NEVER = 0
    LOWER_PRIORITY = 1


class ReclaimWithinCohort(enum.IntEnum):
    """Whom a queue reclaiming its nominal quota may preempt among the cohort's borrowers."""

    NEVER = 0
    # Only borrowers' jobs of lower priority than the preemptor.
    LOWER_PRIORITY = 1
    # Any borrower's job.
    ANY = 2


@dataclass(frozen=True, slots=True)
class ResourceQuota:
    """One resource of one flavor, in canonical units (quantity.py: cpu in millicores, memory in bytes)."""

    nominal: int
    # How much beyond `nominal` the queue (or cohort) may take from its parent; None: no limit.
    borrowing_limit: int | None = None
    # How much of its unused `nominal` others may take; None: all of it.
    lending_limit: int | None = None


@dataclass(frozen=True, slots=True)
class FlavorQuotas:
    """A queue's (or cohort's) quotas in one flavor, by resource name."""

    flavor: str
    resources: Mapping[str, ResourceQuota] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Flavor:
    """A kind of capacity: the clusters that offer it and, for GPUs, the product."""

    name: str
    # The clusters whose labels include all of these offer the flavor (empty: every cluster).
    cluster_labels: Mapping[str, str] = field(default_factory=dict)
    # Nodes labelled nvidia.com/gpu.product with this value (empty: any node).
    gpu_type: str = ""
    # The flavor's nodes carry all of these labels (empty: any node of its clusters).
    node_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Preemption:
    """Whom a queue's pending jobs may preempt, and how often."""

    within_queue: WithinQueue = WithinQueue.LOWER_PRIORITY
    # A queue's nominal quota is its own: by default it takes back what others borrowed of it,
    # whatever their priority (Kueue's default, Never, is what its users complain about).
    reclaim_within_cohort: ReclaimWithinCohort = ReclaimWithinCohort.ANY
    # Preempt borrowers of a queue whose share would stay at least the preemptor's after the
    # preemption (Kueue's LessThanOrEqualToFinalShare).
    fair_share: bool = False
    # At most this many jobs evicted per minute on the queue's behalf (0: no limit), so that
    # fair share does not thrash.
    max_per_minute: float = 0.0


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    cohort: str = ""
    # Fair-share weight: a queue's share counts for share / weight (0: it is served last and
    # preempted first).
    weight: float = 1.0
    # In flavor order: the flavors the queue's jobs may take, tried first to last.
    quotas: tuple[FlavorQuotas, ...] = ()
    strategy: Strategy = Strategy.BEST_EFFORT_FIFO
    # Held: no new admission; running jobs are left alone.
    held: bool = False
    when_can_borrow: WhenCanBorrow = WhenCanBorrow.BORROW
    preemption: Preemption = Preemption()


@dataclass(frozen=True, slots=True)
class CohortSpec:
    name: str
    # The parent cohort ("" for a root).
    parent: str = ""
    # The cohort's own quota, shared with everything under it.
    quotas: tuple[FlavorQuotas, ...] = ()
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class PriorityClass:
    name: str
    value: int
    # Whether jobs of this class may preempt others (False: they only wait).
    may_preempt: bool = True
    # Interruptible work: runs only on capacity nobody else claims and is the first to go.
    interruptible: bool = False


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Every queue, cohort, flavor and priority class the hub holds: one consistent snapshot."""

    queues: Mapping[str, QueueSpec] = field(default_factory=dict)
    cohorts: Mapping[str, CohortSpec] = field(default_factory=dict)
    flavors: Mapping[str, Flavor] = field(default_factory=dict)
    priority_classes: Mapping[str, PriorityClass] = field(default_factory=dict)


def demand_of(pod_sets: tuple[tuple[int, Mapping[str, int]], ...]) -> dict[str, int]:
    """A gang's whole request, by resource: every pod set's count times its pods' requests."""
    total: dict[str, int] = {}
    for count, requests in pod_sets:
        for resource, amount in requests.items():
            total[resource] = total.get(resource, 0) + count * amount
    return total


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    """One (flavor, resource) of a queue or cohort as the queue view shows it."""

    flavor: str
    resource: str
    nominal: int
    borrowing_limit: int | None
    lending_limit: int | None
    # What the queue's admitted jobs hold (for a cohort: its whole subtree's).
    usage: int
    # How much of `usage` is beyond the node's own nominal quota, taken from its cohort.
    borrowed: int
    # How much of the node's unused nominal quota others hold now.
    lent: int


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """A queue or a cohort in the queue view (`fedplane queues`)."""

    name: str
    # "queue" or "cohort".
    kind: str
    # A queue's cohort, a cohort's parent ("" for none).
    parent: str
    resources: tuple[ResourceUsage, ...]
    # Weighted dominant share (fairshare.py).
    share: float
    pending: int = 0
    admitted: int = 0
    held: bool = False
