"""Filter-and-score placement of gangs onto clusters, on real node shapes.

Hard filters first (health, cordon, selector, taints, preferred-group strictness, required
data, GPU type, the gang fitting on actual nodes), then a weighted score that is reported
component by component so that every decision can be explained.

The hub places jobs over every cluster it knows, one cycle after another, so the per-cluster
work per job is kept to a few lookups (a job over 1,000 clusters takes about a millisecond):
views are never modified (place_batch is copy-on-write, `deducted`), which lets the hub
share them between cycles and lets placement cache on them what it derives (totals, node
index, per-shape memo); clusters are ranked by cheap upper bounds and only the best few are
packed (branch and bound); reasons for rejecting a cluster are built only if someone reads them.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from sys import intern, maxunicode
from typing import Any, NamedTuple

from fedplane.core.model import (
    GPU_PRODUCT_LABEL,
    Assignment,
    ClusterView,
    Fits,
    JobRequest,
    NodeView,
    PodSetRequest,
    Taint,
    Toleration,
    pods_fitting,
    untolerated,
)


@dataclass(frozen=True, slots=True)
class Weights:
    data_locality: float = 3.0
    headroom: float = 1.0
    cost: float = 1.0
    preference: float = 2.0


@dataclass(frozen=True, slots=True)
class Score:
    total: float = 0.0
    data_locality: float = 0.0
    headroom: float = 0.0
    cost: float = 0.0
    preference: float = 0.0


_NO_SCORE = Score()


class Verdict:
    """One cluster's verdict for a job: feasible with a score and node assignments, or why not.

    `reasons` may be built on first access (`explain`): placement rejects most clusters of a
    large federation for reasons nobody reads once the job is placed. Only reasons that do not
    depend on free capacity (the cluster-level filters) are deferred, so deducting capacity
    from the views later does not change them.
    """

    __slots__ = ("_explain", "_reasons", "assignments", "cluster", "feasible", "group_rank", "score")

    def __init__(
        self,
        cluster: str,
        feasible: bool,
        reasons: list[str] | None = None,
        score: Score = _NO_SCORE,
        group_rank: int = 0,
        assignments: list[Assignment] | None = None,
        *,
        explain: Callable[[], list[str]] | None = None,
    ) -> None:
        if reasons is None and explain is None:
            reasons = []
        self.cluster = cluster
        self.feasible = feasible
        self._reasons = reasons
        self._explain = explain if reasons is None else None
        self.score = score
        self.group_rank = group_rank
        self.assignments = assignments if assignments is not None else []

    @property
    def reasons(self) -> list[str]:
        if self._reasons is None:
            assert self._explain is not None
            self._reasons, self._explain = self._explain(), None
        return self._reasons

    @reasons.setter
    def reasons(self, reasons: list[str]) -> None:
        self._reasons, self._explain = reasons, None

    def _fields(self) -> tuple[str, bool, list[str], Score, int, list[Assignment]]:
        return (self.cluster, self.feasible, self.reasons, self.score, self.group_rank, self.assignments)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Verdict):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        return (
            f"Verdict(cluster={self.cluster!r}, feasible={self.feasible!r}, reasons={self.reasons!r}, "
            f"score={self.score!r}, group_rank={self.group_rank!r}, assignments={self.assignments!r})"
        )


@dataclass(slots=True)
class Decision:
    """The outcome for one job: a chosen cluster, or none with every cluster's reasons."""

    job_id: str
    cluster: str | None
    verdicts: list[Verdict]

    @property
    def chosen(self) -> Verdict | None:
        return next((v for v in self.verdicts if v.cluster == self.cluster), None)

    def summary(self) -> str:
        if self.cluster is not None:
            chosen = self.chosen
            assert chosen is not None
            return f"placed on {self.cluster} (score {chosen.score.total:.3f})"
        if not self.verdicts:
            return "no clusters are registered"
        counts = Counter(reason for v in self.verdicts for reason in v.reasons[:1])
        parts = [
            f"{v.cluster}: {v.reasons[0]}"
            for v in sorted(self.verdicts, key=lambda v: v.cluster)
            if v.reasons
        ]
        if len(counts) == 1 and len(self.verdicts) > 1:
            return f"no cluster fits: {next(iter(counts))} (all {len(self.verdicts)} clusters)"
        return "no cluster fits: " + "; ".join(parts)


def group_rank(job: JobRequest, cluster: ClusterView) -> int:
    """Index of the first preferred group holding the cluster; len(groups) when in none."""
    for index, group in enumerate(job.groups):
        if group.contains(cluster):
            return index
    return len(job.groups)


def fit_gang(job: JobRequest, cluster: ClusterView) -> tuple[list[Assignment], str]:
    """Assign every pod set's pods to nodes, or say why the gang does not fit.

    Pods of a set are identical, so the number that fit on a node is exact; nodes that can
    take the fewest pods are filled first (best fit), leaving whole nodes for later gangs.
    Every set's required pods (min_count, or count) are placed before any set's optional
    ones, so an elastic set never takes the room another set needs.
    Works on copy-on-write overlays of the free capacity: the cluster is not modified.
    """
    taken: dict[str, dict[str, int]] = {}  # nodes this gang already used: their remaining free
    placed: dict[tuple[str, str], int] = {}
    pod_sets = sorted(job.pod_sets, key=_pod_set_order)
    keys = {p.name: _usable_key(job, p) for p in pod_sets}
    position = cluster.index().position
    for optional in (False, True):
        for pod_set in pod_sets:
            needed = pod_set.min_count or pod_set.count
            want = pod_set.count - needed if optional else needed
            if want <= 0:
                continue
            wanted = tuple((r, a) for r, a in pod_set.requests.items() if a > 0)
            usable_key = keys[pod_set.name]
            placeable = 0
            if taken:
                # Nodes this gang already used count with what it left on them.
                candidates: list[tuple[int, str]] = []
                for node in _usable_nodes(usable_key, cluster):
                    n = pods_fitting(taken.get(node.name, node.free), wanted)
                    if n > 0:
                        candidates.append((n, node.name))
                        placeable += n if n < want else want
                candidates.sort()
            else:
                candidates = _fits(cluster, usable_key, wanted)
                for n, _ in candidates:
                    placeable += n if n < want else want
                    if placeable >= want:
                        break  # enough to know it fits; the exact count only serves a misfit
            if not optional and placeable < needed:
                free_now = {n.name: taken.get(n.name, n.free) for n in cluster.nodes}
                requests = dict(pod_set.requests)
                usable = _usable_nodes(usable_key, cluster)
                return [], _shortfall(pod_set, needed, placeable, cluster, requests, free_now, usable)
            if not candidates:
                continue
            remaining = want
            for n, name in candidates:
                if remaining == 0:
                    break
                take = min(n, remaining)
                remaining -= take
                node_free = taken.get(name)
                if node_free is None:
                    node_free = taken[name] = dict(cluster.nodes[position[name]].free)
                for resource, amount in wanted:
                    node_free[resource] = node_free.get(resource, 0) - amount * take
                placed[(pod_set.name, name)] = placed.get((pod_set.name, name), 0) + take
    return [Assignment(pod_set, node, count) for (pod_set, node), count in placed.items()], ""


_UsableKey = tuple[tuple[Toleration, ...], str, tuple[tuple[str, str], ...]]


def _usable_key(job: JobRequest, pod_set: PodSetRequest) -> _UsableKey:
    """What decides which nodes a pod set may use: its tolerations, GPU type and node selector."""
    return _tolerations(job, pod_set), pod_set.gpu_type, pod_set.node_selector


def _usable_positions(key: _UsableKey, cluster: ClusterView) -> list[int]:
    """Positions of the nodes pods with these tolerations, GPU type and node selector may run on
    (cached in the index)."""
    usable = cluster.index().usable
    positions = usable.get(key)
    if positions is None:
        tolerations, gpu_type, selector = key
        positions = usable[key] = [
            i
            for i, n in enumerate(cluster.nodes)
            if n.schedulable
            and not (n.taints and untolerated(n.taints, tolerations))
            and (not gpu_type or n.labels.get(GPU_PRODUCT_LABEL, "") == gpu_type)
            and all(n.labels.get(k) == v for k, v in selector)
        ]
    return positions


def _usable_nodes(key: _UsableKey, cluster: ClusterView) -> list[NodeView]:
    nodes = cluster.nodes
    return [nodes[i] for i in _usable_positions(key, cluster)]


def _fits(
    cluster: ClusterView, key: _UsableKey, wanted: tuple[tuple[str, int], ...]
) -> list[tuple[int, str]]:
    """Best-fit candidates for a pod shape on the cluster's free capacity, cached on the view.

    Scanning every node for every job was most of placement's cost; the list is built once
    per view and shape, and a deducted view gets it updated for the nodes it changed
    (`ClusterView.with_free`), so placing a job costs what it changes, not the size of the cluster.
    """
    cache_key = (key, wanted)
    cached = cluster._fits.get(cache_key)
    if cached is None:
        if len(cluster._fits) >= _MEMO_LIMIT:
            cluster._fits.clear()
        cached = cluster._fits[cache_key] = Fits.of(cluster.nodes, _usable_positions(key, cluster), wanted)
    entries: list[tuple[int, str]] = cached.entries
    return entries


_STANDARD_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage", "pods"})


def _tolerations(job: JobRequest, pod_set: PodSetRequest) -> tuple[Toleration, ...]:
    """The job's tolerations plus one per extended resource the pod set requests.

    Kubernetes' ExtendedResourceToleration admission does the same, so GPU nodes can carry a
    `nvidia.com/gpu:NoSchedule` taint that keeps CPU-only pods off them.
    """
    implicit = tuple(
        Toleration(key=r, operator="Exists")
        for r, amount in pod_set.requests.items()
        if amount > 0 and r not in _STANDARD_RESOURCES
    )
    return job.tolerations + implicit if implicit else job.tolerations


def _pod_set_order(pod_set: PodSetRequest) -> tuple[int, str]:
    # GPU and large sets first: they have the fewest places to go.
    return (-(pod_set.requests.get("nvidia.com/gpu", 0) * 1000 + len(pod_set.requests)), pod_set.name)


def _shortfall(
    pod_set: PodSetRequest,
    needed: int,
    placeable: int,
    cluster: ClusterView,
    requests: dict[str, int],
    free: dict[str, dict[str, int]],
    usable: list[NodeView],
) -> str:
    """Explain a gang misfit, distinguishing too little capacity from capacity in the wrong shape."""
    if pod_set.gpu_type and not any(
        n.labels.get(GPU_PRODUCT_LABEL) == pod_set.gpu_type for n in cluster.nodes
    ):
        products = sorted(
            {n.labels[GPU_PRODUCT_LABEL] for n in cluster.nodes if GPU_PRODUCT_LABEL in n.labels}
        )
        have = ", ".join(products) if products else "no GPUs"
        return f"pod set {pod_set.name}: no node has GPU type {pod_set.gpu_type} (cluster has {have})"
    selector = pod_set.node_selector
    if selector and not any(all(n.labels.get(k) == v for k, v in selector) for n in cluster.nodes):
        wanted = ", ".join(f"{k}={v}" for k, v in selector)
        return f"pod set {pod_set.name}: no node has the labels {wanted}"
    # Only nodes the pod set may use count: capacity on tainted or cordoned nodes is no help.
    excluded = len(cluster.nodes) - len(usable)
    causes = ["unschedulable", "untolerated taint"]
    causes += ["other GPU type"] if pod_set.gpu_type else []
    causes += ["other node labels"] if pod_set.node_selector else []
    note = (
        f"; {excluded} of {len(cluster.nodes)} nodes unusable: {', '.join(causes[:-1])} or {causes[-1]}"
        if excluded
        else ""
    )
    short = []
    for resource, amount in requests.items():
        if amount <= 0:
            continue
        total_free = sum(free[n.name].get(resource, 0) for n in usable)
        if total_free < amount * needed:
            short.append(f"{resource} {total_free} free < {amount * needed} needed")
    if short:
        return f"pod set {pod_set.name}: insufficient capacity ({', '.join(short)}{note})"
    return (
        f"pod set {pod_set.name}: only {placeable} of {needed} pods fit on the nodes "
        f"(enough capacity in total, but fragmented across nodes{note})"
    )


def filter_cluster(job: JobRequest, cluster: ClusterView) -> list[str]:
    """Cluster-level hard filters; the reasons a cluster is out (empty = passes)."""
    reasons: list[str] = []
    if not cluster.ready:
        reasons.append(
            f"cluster not ready{': ' + cluster.not_ready_reason if cluster.not_ready_reason else ''}"
        )
    if cluster.cordoned:
        reasons.append("cluster is cordoned")
    for key, value in job.cluster_selector.items():
        actual = cluster.labels.get(key)
        if actual != value:
            has = f"has {key}={actual}" if actual is not None else f"has no {key} label"
            reasons.append(f"selector {key}={value} not matched (cluster {has})")
    for taint in untolerated(cluster.taints, job.tolerations):
        reasons.append(f"cluster taint {taint} not tolerated")
    if job.strict_groups and job.groups and group_rank(job, cluster) == len(job.groups):
        reasons.append("not in any preferred cluster group (strict)")
    for dataset in job.datasets:
        if dataset.required and dataset.id not in cluster.datasets:
            reasons.append(f"required dataset {dataset.id} not present")
    return reasons


# A cluster that passed the cluster-level filters and may fit the gang: (group rank, minus an
# upper bound of its score, name, position, locality, cost, preference, whether the bound is
# the tight one). Tuples, in heap order: a large federation has many candidates and branch
# and bound packs only the first few.
_Entry = tuple[int, float, str, int, float, float, float, bool]


class _Screening(NamedTuple):
    candidates: list[_Entry]
    rejected: list[Verdict]
    hopeless: list[_Entry]
    # The tight entry for a loose one, or None when the gang's required pods cannot fit.
    tighten: Callable[[_Entry], _Entry | None]
    # The entry of the (eligible) cluster now at a position: what a changed view screens to.
    entry_at: Callable[[int], _Entry]


def _screen(job: JobRequest, clusters: Sequence[ClusterView], weights: Weights, lazy: bool) -> _Screening:
    """Split clusters into candidates, verdicts of those filtered out, and candidates that cannot fit.

    The filters are the same as filter_cluster's, checked without building reasons: with
    `lazy`, a rejected cluster's reasons are built only if read. Cost is relative to the
    cheapest cluster passing the filters, so each candidate's score parts are known before
    any gang is packed.

    Candidates get a loose upper bound first (_headroom_ceiling: it depends on which resources
    the gang uses, not how much, so it is shared by gangs alike); the returned `tighten` gives
    the tight one (_fewest_headroom), or None when the cluster's schedulable nodes lack the free
    capacity the gang's required pods need (ClusterView.room). Branch and bound tightens only
    the entries that reach the top of its heap. A cluster without a GPU type the gang needs
    goes straight to the last list.

    This runs for every cluster for every job, so it is written for speed: plain loops, the
    score arithmetic of _combine inlined, and each cluster's entry memoized on the view by what
    it depends on (as is the tight headroom), so that a view that has not changed costs a
    lookup per job. Views are not modified (deduct() clears the memo).
    """
    selector = tuple(job.cluster_selector.items())
    tolerations = job.tolerations
    required = tuple(d.id for d in job.datasets if d.required)
    groups = job.groups
    strict = job.strict_groups and bool(groups)
    plain = not (selector or required or strict)
    blocked: dict[tuple[Taint, ...], bool] = {}
    rejected: list[Verdict] = []
    eligible: list[int] = []
    cheapest = 0.0  # the lowest positive cost of a cluster passing the filters
    for position, cluster in enumerate(clusters):
        if cluster.ready and not cluster.cordoned:
            taints = cluster.taints
            ok = True
            if taints:
                is_blocked = blocked.get(taints)
                if is_blocked is None:
                    is_blocked = blocked[taints] = bool(untolerated(taints, tolerations))
                ok = not is_blocked
            if ok and (plain or _selected(cluster, selector, required, job, strict)):
                eligible.append(position)
                cost = cluster.cost
                if cost > 0 and (cost < cheapest or not cheapest):
                    cheapest = cost
                continue
        rank = group_rank(job, cluster) if groups else 0
        if lazy:
            explain = partial(filter_cluster, job, cluster)
            rejected.append(Verdict(cluster.name, False, None, _NO_SCORE, rank, explain=explain))
        else:
            rejected.append(Verdict(cluster.name, False, filter_cluster(job, cluster), _NO_SCORE, rank))
    wanted = sum(d.size for d in job.datasets)
    fewest = _usage(job, {p.name: p.min_count or p.count for p in job.pod_sets})
    used = [(r, a) for r, a in fewest.items() if a > 0]
    types = frozenset(p.gpu_type for p in job.pod_sets if p.gpu_type and (p.min_count or p.count) > 0)
    # Memo keys (see ClusterView._memo): what an entry depends on besides the cluster, and what
    # the tight bound's headroom depends on. Interned strings: hashed once per job, not per
    # cluster, and the same objects for every job alike, so that hits compare by identity.
    resources = repr(([r for r, _ in used], sorted(types)))
    entry_key = intern(f"entry {resources} {cheapest!r} {weights!r} {job.datasets!r} {job.groups!r}")
    headroom_key = intern(f"headroom {used!r} {resources}")
    w_locality, w_headroom = weights.data_locality, weights.headroom
    w_cost, w_preference = weights.cost, weights.preference
    weight_sum = (w_locality + w_headroom + w_cost + w_preference) or 1.0
    candidates: list[_Entry] = []
    hopeless: list[_Entry] = []
    candidate, no_fit = candidates.append, _HOPELESS  # locals: this loop is the hot path

    def fresh(position: int, memo: dict[str, Any]) -> _Entry:
        """The entry of the cluster at `position`, computed (a memo miss) and memoized."""
        cluster = clusters[position]
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        rank = group_rank(job, cluster) if groups else 0
        locality = (
            sum(min(cluster.datasets.get(d.id, 0), d.size) for d in job.datasets) / wanted
            if wanted > 0
            else 0.0
        )
        cost = cheapest / cluster.cost if cluster.cost > 0 and cheapest > 0 else 1.0
        preference = 1.0 - rank / len(groups) if groups else 0.0
        ceiling = _headroom_ceiling(cluster, used, types)
        if ceiling < 0.0:
            entry = (rank, _HOPELESS, cluster.name, position, locality, cost, preference, True)
        else:
            # The score with a headroom no packing can beat (_total inlined, not yet rounded).
            bound = (
                w_locality * locality + w_headroom * ceiling + w_cost * cost + w_preference * preference
            ) / weight_sum
            entry = (rank, -bound, cluster.name, position, locality, cost, preference, False)
        memo[entry_key] = entry
        return entry

    def entry_at(position: int) -> _Entry:
        memo = clusters[position]._memo
        entry: _Entry | None = memo.get(entry_key)
        return entry if entry is not None and entry[3] == position else fresh(position, memo)

    for position in eligible:
        entry = entry_at(position)
        if entry[1] == no_fit:
            hopeless.append(entry)
        else:
            candidate(entry)

    def tighten(entry: _Entry) -> _Entry | None:
        """The entry with the tight bound: the score with the fewest pods the gang may run with.

        None if the gang's required pods cannot fit (see _fewest_headroom).
        """
        rank, _, name, position, locality, cost, preference, _ = entry
        memo = clusters[position]._memo
        headroom = memo.get(headroom_key)
        if headroom is None:
            headroom = memo[headroom_key] = _fewest_headroom(clusters[position], used, types)
        if headroom < 0.0:
            return None
        bound = (
            w_locality * locality + w_headroom * headroom + w_cost * cost + w_preference * preference
        ) / weight_sum
        return (rank, -bound, name, position, locality, cost, preference, True)

    return _Screening(candidates, rejected, hopeless, tighten, entry_at)


_MEMO_LIMIT = 64
# In place of minus the bound: the entry of a cluster the gang cannot fit (see _fewest_headroom).
_HOPELESS = math.inf


def _free_and_allocatable(cluster: ClusterView) -> tuple[dict[str, int], dict[str, int]]:
    """The cluster's cached free and allocatable totals (allocatable falls back to free when unknown)."""
    totals = cluster._totals
    free = totals.get("free")
    if free is None:
        free = cluster.total("free")
    allocatable = totals.get("allocatable")
    if allocatable is None:
        allocatable = cluster.total("allocatable")
    return free, allocatable or free


def _headroom_ceiling(cluster: ClusterView, used: list[tuple[str, int]], types: frozenset[str]) -> float:
    """At least _fewest_headroom whatever the amounts used (so shared by gangs using alike), or -1.

    Each resource's fraction left, max(0, free - used) / allocatable, is at most
    max(0, free) / allocatable; -1 if the cluster lacks a GPU type the gang requires.
    """
    if types and not types <= cluster.index().products:
        return -1.0
    if not used:
        return 1.0
    free, allocatable = _free_and_allocatable(cluster)
    scarcest = -1.0  # none yet
    for resource, _ in used:
        whole = allocatable.get(resource, 0)
        if whole > 0:
            left = free.get(resource, 0)
            fraction = left / whole if left > 0 else 0.0
            if scarcest < 0.0 or fraction < scarcest:
                scarcest = fraction
    return scarcest if scarcest >= 0.0 else 0.0


def _fewest_headroom(cluster: ClusterView, used: list[tuple[str, int]], types: frozenset[str]) -> float:
    """_headroom for the `used` resources of a gang's required pods, or -1 if they cannot fit.

    They cannot fit if the cluster's schedulable nodes lack the free capacity (see
    ClusterView.room) or the GPU types they need, whatever the node shapes.
    """
    if types and not types <= cluster.index().products:
        return -1.0
    if not used:
        return 1.0
    totals = cluster._totals
    room = totals.get("room")
    if room is None:
        room = cluster.room()
    free, allocatable = _free_and_allocatable(cluster)
    scarcest = -1.0  # none yet
    for resource, amount in used:
        if room.get(resource, 0) < amount:
            return -1.0
        whole = allocatable.get(resource, 0)
        if whole > 0:
            left = free.get(resource, 0) - amount
            fraction = left / whole if left > 0 else 0.0
            if scarcest < 0.0 or fraction < scarcest:
                scarcest = fraction
    return scarcest if scarcest >= 0.0 else 0.0


def _selected(
    cluster: ClusterView,
    selector: tuple[tuple[str, str], ...],
    required: tuple[str, ...],
    job: JobRequest,
    strict: bool,
) -> bool:
    """The selector, required-data and strict-group filters (see filter_cluster)."""
    if selector:
        labels = cluster.labels
        for key, value in selector:
            if labels.get(key) != value:
                return False
    if required:
        held = cluster.datasets
        for dataset in required:
            if dataset not in held:
                return False
    return not strict or group_rank(job, cluster) < len(job.groups)


def _pack(job: JobRequest, cluster: ClusterView, entry: _Entry, weights: Weights) -> Verdict:
    rank, _, _, _, locality, cost, preference, _ = entry
    assignments, misfit = fit_gang(job, cluster)
    if misfit:
        return Verdict(cluster.name, False, [misfit], _NO_SCORE, rank)
    placed: dict[str, int] = {}
    for a in assignments:
        placed[a.pod_set] = placed.get(a.pod_set, 0) + a.count
    used = [(r, amount) for r, amount in _usage(job, placed).items() if amount > 0]
    score = _combine(weights, locality, _headroom(cluster, used), cost, preference)
    return Verdict(cluster.name, True, [], score, rank, assignments)


def evaluate(job: JobRequest, clusters: Sequence[ClusterView], weights: Weights = Weights()) -> list[Verdict]:
    """Every cluster's verdict for the job, best first (feasible ones ordered by preference, score)."""
    screening = _screen(job, clusters, weights, lazy=False)
    verdicts = screening.rejected
    verdicts += [
        _pack(job, clusters[entry[3]], entry, weights) for entry in screening.candidates + screening.hopeless
    ]
    verdicts.sort(key=_rank_key)
    return verdicts


def best_verdicts(
    job: JobRequest, clusters: Sequence[ClusterView], weights: Weights = Weights()
) -> list[Verdict]:
    """Verdicts enough to know the best cluster: the same choice as evaluate(), far fewer gang fits.

    Candidates are packed in order of their upper-bound score (popped from a heap: usually
    only the first few are needed); packing stops once the best feasible verdict ranks ahead
    of every remaining bound (branch and bound). When something fits, the verdicts are the
    packed clusters' and those of clusters the cluster-level filters rejected, whose reasons
    are built on first read; clusters shown unable to fit without packing are left out. When
    nothing fits, every cluster has a verdict and every reason is there.
    """
    return _best_verdicts(job, clusters, weights)[0]


def _best_verdicts(
    job: JobRequest, clusters: Sequence[ClusterView], weights: Weights
) -> tuple[list[Verdict], int]:
    """best_verdicts(), and the position of the chosen cluster in `clusters` (-1 if none)."""
    return ShapeScreen(job, clusters, weights).best(job)


class ShapeScreen:
    """Branch and bound for jobs of one shape (`shape_of`), kept up to date across a batch.

    A cluster gives every job of a shape the same entry, tight bound and gang fit until its
    view changes, and within a batch each placed job changes one view. So the clusters are
    screened once per shape, a changed view is screened again on its own (`changed`), and
    tight bounds and packings are kept until their cluster changes. The entries are kept
    sorted, so a job walks them without copying, and skips at once a run of clusters that
    can at best tie with its best one and lose on the name (alike clusters of a large
    federation). Over 1,000 clusters the next job of a shape then costs the few clusters
    branch and bound packs, not a screen of all of them. Its verdicts and choice are what
    best_verdicts gives on the same views.
    """

    def __init__(self, job: JobRequest, clusters: Sequence[ClusterView], weights: Weights) -> None:
        screening = _screen(job, clusters, weights, lazy=True)
        self._clusters = clusters  # read at use: the caller replaces the views it changes
        self._weights = weights
        self._rejected = screening.rejected
        self._tighten = screening.tighten
        self._entry_at = screening.entry_at
        # Candidates in branch-and-bound order, and the entry of each candidate position.
        self._order = sorted(screening.candidates)
        self._entries = {entry[3]: entry for entry in screening.candidates}
        # Candidates shown unable to fit: no GPU type (screened), or no room (tightened).
        self._hopeless = {entry[3]: entry for entry in screening.hopeless}
        self._packed: dict[int, Verdict] = {}

    def changed(self, position: int) -> None:
        """The view at `position` was replaced (a deduction): screen it again."""
        self._packed.pop(position, None)
        old = self._entries.pop(position, None)
        if old is not None:
            del self._order[bisect_left(self._order, old)]
        elif self._hopeless.pop(position, None) is None:
            return  # filtered out, which capacity does not change
        entry = self._entry_at(position)
        if entry[1] == _HOPELESS:
            self._hopeless[position] = entry
        else:
            self._entries[position] = entry
            insort(self._order, entry)

    def _pack(self, job: JobRequest, entry: _Entry) -> Verdict:
        position = entry[3]
        verdict = self._packed.get(position)
        if verdict is None:
            verdict = self._packed[position] = _pack(job, self._clusters[position], entry, self._weights)
        return verdict

    def best(self, job: JobRequest) -> tuple[list[Verdict], int]:
        """best_verdicts() for `job` (of this shape) on the views as they are, and the chosen position."""
        order = self._order
        packed: list[Verdict] = []
        best: Verdict | None = None
        chosen = -1
        # Bounds are rounded like scores only when compared (round() costs more than the rest
        # of a bound); `last` keeps the last one, since equal clusters have equal bounds.
        last: tuple[float, float] | None = None
        i = 0
        while i < len(order):
            entry = order[i]
            if best is not None:
                if entry[0] > best.group_rank:
                    break
                if last is None or entry[1] != last[0]:
                    last = (entry[1], -round(-entry[1], 6))
                if last[1] > -best.score.total:
                    break  # this and every later bound round below the best score
                if last[1] == -best.score.total and entry[2] > best.cluster:
                    # At best a tie, lost on the name, as is every later entry of this very
                    # bound (their names come later): skip them all.
                    i = bisect_right(order, (entry[0], entry[1], _AFTER_EVERY_NAME))
                    continue
            if not entry[7]:
                # A loose bound: tighten it (far fewer clusters get here than are screened),
                # for this job and the shape's later ones. The tight entry sorts at or after i.
                position = entry[3]
                tight = self._tighten(entry)
                del order[i]
                if tight is None:
                    del self._entries[position]
                    self._hopeless[position] = entry
                else:
                    self._entries[position] = tight
                    insort(order, tight)
                continue
            i += 1
            verdict = self._pack(job, entry)
            packed.append(verdict)
            if verdict.feasible and (best is None or _rank_key(verdict) < _rank_key(best)):
                best, chosen = verdict, entry[3]
        if best is None:
            packed += [self._pack(job, entry) for entry in self._hopeless.values()]
        feasible = sorted((v for v in packed if v.feasible), key=_rank_key)
        # Infeasible verdicts all score 0: by group rank, then name, as _rank_key orders them.
        verdicts = self._rejected + [v for v in packed if not v.feasible]
        verdicts.sort(key=_INFEASIBLE_ORDER)
        return feasible + verdicts, chosen


# Sorts after every cluster name, so that (rank, bound, _AFTER_EVERY_NAME) follows every entry
# of that rank and bound.
_AFTER_EVERY_NAME = chr(maxunicode)


class BatchPlacement:
    """Places a batch job by job on copy-on-write views, with one ShapeScreen per job shape.

    A placed job's cluster is replaced by a deducted view; each shape's screening catches up
    with the replaced views when its next job is placed.
    """

    def __init__(self, clusters: Sequence[ClusterView], weights: Weights) -> None:
        self.working = list(clusters)
        self._weights = weights
        self._changed: list[int] = []  # positions replaced, in order
        self._screens: dict[Hashable, ShapeScreen] = {}
        # Per shape, how many of the replacements its screen has caught up with.
        self._caught_up: dict[Hashable, int] = {}

    def place(self, job: JobRequest, shape: Hashable | None = None) -> Decision:
        """Decide `job` (whose shape_of is `shape`, if known) and deduct it where it goes."""
        key = shape if shape is not None else shape_of(job)
        screen = self._screens.get(key)
        if screen is None:
            screen = self._screens[key] = ShapeScreen(job, self.working, self._weights)
        else:
            for position in self._changed[self._caught_up[key] :]:
                screen.changed(position)
        self._caught_up[key] = len(self._changed)
        verdicts, chosen = screen.best(job)
        if chosen < 0:
            return Decision(job.id, None, verdicts)
        best = verdicts[0]
        self.working[chosen] = deducted(self.working[chosen], job, best.assignments)
        self._changed.append(chosen)
        return Decision(job.id, best.cluster, verdicts)


def shape_of(job: JobRequest) -> Hashable:
    """Everything about a job that placement looks at, except who it is and when it came."""
    return (
        tuple(
            (p.name, p.count, p.min_count, tuple(sorted(p.requests.items())), p.gpu_type, p.node_selector)
            for p in job.pod_sets
        ),
        tuple(sorted(job.cluster_selector.items())),
        job.tolerations,
        tuple((g.clusters, tuple(sorted(g.match_labels.items()))) for g in job.groups),
        job.strict_groups,
        job.datasets,
    )


def _rank_key(verdict: Verdict) -> tuple[bool, int, float, str]:
    return (not verdict.feasible, verdict.group_rank, -verdict.score.total, verdict.cluster)


_INFEASIBLE_ORDER = attrgetter("group_rank", "cluster")


def _total(weights: Weights, locality: float, headroom: float, cost: float, preference: float) -> float:
    weight_sum = weights.data_locality + weights.headroom + weights.cost + weights.preference
    total = (
        weights.data_locality * locality
        + weights.headroom * headroom
        + weights.cost * cost
        + weights.preference * preference
    ) / (weight_sum or 1.0)
    return round(total, 6)


def _combine(weights: Weights, locality: float, headroom: float, cost: float, preference: float) -> Score:
    return Score(
        _total(weights, locality, headroom, cost, preference),
        round(locality, 6),
        round(headroom, 6),
        round(cost, 6),
        round(preference, 6),
    )


def _usage(job: JobRequest, pods: dict[str, int]) -> dict[str, int]:
    """Resources used by `pods[pod_set]` pods of each pod set."""
    used: dict[str, int] = {}
    for pod_set in job.pod_sets:
        for resource, amount in pod_set.requests.items():
            used[resource] = used.get(resource, 0) + amount * pods.get(pod_set.name, 0)
    return used


def _headroom(cluster: ClusterView, used: list[tuple[str, int]]) -> float:
    """Fraction of the scarcest requested resource left free in the cluster after placement.

    `used` lists the resources used in positive amounts.
    """
    if not used:
        return 1.0
    free, allocatable = _free_and_allocatable(cluster)
    scarcest: float | None = None
    for resource, amount in used:
        total = allocatable.get(resource, 0)
        if total > 0:
            fraction = max(0, free.get(resource, 0) - amount) / total
            if scarcest is None or fraction < scarcest:
                scarcest = fraction
    return scarcest if scarcest is not None else 0.0


def deduct(cluster: ClusterView, job: JobRequest, assignments: Iterable[Assignment]) -> None:
    """Take the assigned pods' requests out of the cluster's node free capacity (in place)."""
    requests = {p.name: p.requests for p in job.pod_sets}
    position = cluster.index().position
    # The cached totals follow the nodes (see ClusterView.took); the memo is out of date.
    free_total, room = cluster._totals.get("free"), cluster._totals.get("room")
    cluster._memo.clear()
    cluster._fits.clear()
    for a in assignments:
        node = cluster.nodes[position[a.node]]
        free = node.free
        for resource, amount in requests[a.pod_set].items():
            before = free.get(resource, 0)
            free[resource] = after = before - amount * a.count
            if free_total is not None:
                free_total[resource] = free_total.get(resource, 0) - amount * a.count
            if room is not None and node.schedulable:
                room[resource] = room.get(resource, 0) + max(0, after) - max(0, before)


def deducted(cluster: ClusterView, job: JobRequest, assignments: Iterable[Assignment]) -> ClusterView:
    """The cluster after deduct(), as a new view: copy-on-write, the cluster itself is not modified.

    Only the nodes the assignments use are copied (`ClusterView.with_free`), so views handed
    to placement can be shared, and a deduction costs what it touches.
    """
    requests = {p.name: p.requests for p in job.pod_sets}
    position = cluster.index().position
    changes: dict[int, dict[str, int]] = {}
    for a in assignments:
        i = position[a.node]
        free = changes.get(i)
        if free is None:
            free = changes[i] = dict(cluster.nodes[i].free)
        for resource, amount in requests[a.pod_set].items():
            free[resource] = free.get(resource, 0) - amount * a.count
    return cluster.with_free(changes)


def place_batch(
    jobs: Iterable[JobRequest], clusters: Sequence[ClusterView], weights: Weights = Weights()
) -> list[Decision]:
    """Place jobs in priority then submission order, deducting capacity as it goes.

    A job placed earlier in the batch reduces what later jobs see, so capacity is never
    promised twice. Copy-on-write: a cluster is replaced by a deducted copy when a job goes
    there (`deducted`), so the views passed in are never modified and cost nothing to pass.
    A job that fits nowhere does not block later ones.
    """
    batch = BatchPlacement(clusters, weights)
    return [batch.place(job) for job in sorted(jobs, key=lambda j: (-j.priority, j.seq, j.id))]
