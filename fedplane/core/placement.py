"""Filter-and-score placement of gangs onto clusters, on real node shapes.

Hard filters first (health, cordon, selector, taints, preferred-group strictness, required
data, GPU type, the gang fitting on actual nodes), then a weighted score that is reported
component by component so that every decision can be explained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fedplane.core.model import (
    GPU_PRODUCT_LABEL,
    Assignment,
    ClusterView,
    JobRequest,
    NodeView,
    PodSetRequest,
    Toleration,
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


@dataclass(slots=True)
class Verdict:
    cluster: str
    feasible: bool
    reasons: list[str] = field(default_factory=list)
    score: Score = field(default_factory=Score)
    group_rank: int = 0
    assignments: list[Assignment] = field(default_factory=list)


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


def _pods_fitting(node: NodeView, requests: dict[str, int]) -> int:
    fits: int | None = None
    for resource, amount in requests.items():
        if amount <= 0:
            continue
        n = node.free.get(resource, 0) // amount
        if fits is None or n < fits:
            fits = n
            if fits == 0:
                return 0
    return fits if fits is not None else 1 << 30


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
    usable_by_set = {p.name: _usable_nodes(job, p, cluster) for p in pod_sets}
    for optional in (False, True):
        for pod_set in pod_sets:
            needed = pod_set.min_count or pod_set.count
            want = pod_set.count - needed if optional else needed
            if want <= 0:
                continue
            wanted = [(r, a) for r, a in pod_set.requests.items() if a > 0]
            usable = usable_by_set[pod_set.name]
            candidates: list[tuple[int, str]] = []
            placeable = 0
            for node in usable:
                free = taken.get(node.name, node.free)
                # Uncapped, so that best fit can tell a nearly full node from an empty one.
                n = min((free.get(r, 0) // a for r, a in wanted), default=1 << 30)
                if n > 0:
                    candidates.append((n, node.name))
                    placeable += min(n, want)
            if not optional and placeable < needed:
                free_now = {n.name: taken.get(n.name, n.free) for n in cluster.nodes}
                requests = dict(pod_set.requests)
                return [], _shortfall(pod_set, needed, placeable, cluster, requests, free_now, usable)
            remaining = want
            nodes = {n.name: n for n in usable} if candidates else {}
            for n, name in sorted(candidates):
                if remaining == 0:
                    break
                take = min(n, remaining)
                remaining -= take
                node_free = taken.get(name)
                if node_free is None:
                    node_free = taken[name] = dict(nodes[name].free)
                for resource, amount in wanted:
                    node_free[resource] = node_free.get(resource, 0) - amount * take
                placed[(pod_set.name, name)] = placed.get((pod_set.name, name), 0) + take
    return [Assignment(pod_set, node, count) for (pod_set, node), count in placed.items()], ""


def _usable_nodes(job: JobRequest, pod_set: PodSetRequest, cluster: ClusterView) -> list[NodeView]:
    tolerations = _tolerations(job, pod_set)
    gpu_type = pod_set.gpu_type
    return [
        n
        for n in cluster.nodes
        if n.schedulable
        and not (n.taints and untolerated(n.taints, tolerations))
        and (not gpu_type or n.labels.get(GPU_PRODUCT_LABEL, "") == gpu_type)
    ]


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
    return job.tolerations + implicit


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
    # Only nodes the pod set may use count: capacity on tainted or cordoned nodes is no help.
    excluded = len(cluster.nodes) - len(usable)
    note = (
        f"; {excluded} of {len(cluster.nodes)} nodes unusable: "
        + (
            "unschedulable, untolerated taint or other GPU type"
            if pod_set.gpu_type
            else "unschedulable or untolerated taint"
        )
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


@dataclass(slots=True)
class _Candidate:
    """A cluster that passed the cluster-level filters, with the score parts known before packing."""

    cluster: ClusterView
    rank: int
    locality: float
    cost: float
    preference: float
    # Score with the fewest pods the gang may run with: no packing can score higher.
    bound: Score


def _candidates(
    job: JobRequest, clusters: Sequence[ClusterView], weights: Weights
) -> tuple[list[_Candidate], list[Verdict]]:
    """Split clusters into candidates (with an upper-bound score) and verdicts of those filtered out.

    Cost is relative to the cheapest candidate, so it is known before any gang is packed.
    """
    rejected: list[Verdict] = []
    eligible: list[ClusterView] = []
    for cluster in clusters:
        reasons = filter_cluster(job, cluster)
        if reasons:
            rejected.append(Verdict(cluster.name, False, reasons, Score(), group_rank(job, cluster)))
        else:
            eligible.append(cluster)
    costs = [c.cost for c in eligible if c.cost > 0]
    cheapest = min(costs) if costs else 0.0
    wanted = sum(d.size for d in job.datasets)
    fewest = _usage(job, {p.name: p.min_count or p.count for p in job.pod_sets})
    candidates = []
    for cluster in eligible:
        rank = group_rank(job, cluster)
        locality = (
            sum(min(cluster.datasets.get(d.id, 0), d.size) for d in job.datasets) / wanted
            if wanted > 0
            else 0.0
        )
        cost = cheapest / cluster.cost if cluster.cost > 0 and cheapest > 0 else 1.0
        preference = 1.0 - rank / len(job.groups) if job.groups else 0.0
        bound = _combine(weights, locality, _headroom(cluster, fewest), cost, preference)
        candidates.append(_Candidate(cluster, rank, locality, cost, preference, bound))
    return candidates, rejected


def _pack(job: JobRequest, candidate: _Candidate, weights: Weights) -> Verdict:
    cluster = candidate.cluster
    assignments, misfit = fit_gang(job, cluster)
    if misfit:
        return Verdict(cluster.name, False, [misfit], Score(), candidate.rank)
    placed: dict[str, int] = {}
    for a in assignments:
        placed[a.pod_set] = placed.get(a.pod_set, 0) + a.count
    headroom = _headroom(cluster, _usage(job, placed))
    score = _combine(weights, candidate.locality, headroom, candidate.cost, candidate.preference)
    return Verdict(cluster.name, True, [], score, candidate.rank, assignments)


def evaluate(job: JobRequest, clusters: Sequence[ClusterView], weights: Weights = Weights()) -> list[Verdict]:
    """Every cluster's verdict for the job, best first (feasible ones ordered by preference, score)."""
    candidates, verdicts = _candidates(job, clusters, weights)
    verdicts += [_pack(job, c, weights) for c in candidates]
    verdicts.sort(key=_rank_key)
    return verdicts


def best_verdicts(
    job: JobRequest, clusters: Sequence[ClusterView], weights: Weights = Weights()
) -> list[Verdict]:
    """Verdicts enough to know the best cluster: the same choice as evaluate(), far fewer gang fits.

    Candidates are packed in order of their upper-bound score; packing stops once the best
    feasible verdict ranks ahead of every remaining bound (branch and bound). When nothing
    fits, every cluster has been tried and every reason is there.
    """
    candidates, verdicts = _candidates(job, clusters, weights)
    candidates.sort(key=lambda c: (c.rank, -c.bound.total, c.cluster.name))
    best: Verdict | None = None
    for candidate in candidates:
        if best is not None and _rank_key(best) <= (
            False,
            candidate.rank,
            -candidate.bound.total,
            candidate.cluster.name,
        ):
            break
        verdict = _pack(job, candidate, weights)
        verdicts.append(verdict)
        if verdict.feasible and (best is None or _rank_key(verdict) < _rank_key(best)):
            best = verdict
    verdicts.sort(key=_rank_key)
    return verdicts


def _rank_key(verdict: Verdict) -> tuple[bool, int, float, str]:
    return (not verdict.feasible, verdict.group_rank, -verdict.score.total, verdict.cluster)


def _combine(weights: Weights, locality: float, headroom: float, cost: float, preference: float) -> Score:
    weight_sum = weights.data_locality + weights.headroom + weights.cost + weights.preference
    total = (
        weights.data_locality * locality
        + weights.headroom * headroom
        + weights.cost * cost
        + weights.preference * preference
    ) / (weight_sum or 1.0)
    return Score(
        round(total, 6), round(locality, 6), round(headroom, 6), round(cost, 6), round(preference, 6)
    )


def _usage(job: JobRequest, pods: dict[str, int]) -> dict[str, int]:
    """Resources used by `pods[pod_set]` pods of each pod set."""
    used: dict[str, int] = {}
    for pod_set in job.pod_sets:
        for resource, amount in pod_set.requests.items():
            used[resource] = used.get(resource, 0) + amount * pods.get(pod_set.name, 0)
    return used


def _headroom(cluster: ClusterView, used: dict[str, int]) -> float:
    """Fraction of the scarcest requested resource left free in the cluster after placement."""
    used = {r: a for r, a in used.items() if a > 0}
    if not used:
        return 1.0
    free = cluster.total("free")
    allocatable = cluster.total("allocatable") or free
    fractions = [
        max(0, free.get(r, 0) - amount) / allocatable[r]
        for r, amount in used.items()
        if allocatable.get(r, 0) > 0
    ]
    return min(fractions) if fractions else 0.0


def deduct(cluster: ClusterView, job: JobRequest, assignments: Iterable[Assignment]) -> None:
    """Take the assigned pods' requests out of the cluster's node free capacity (in place)."""
    requests = {p.name: p.requests for p in job.pod_sets}
    nodes = {n.name: n for n in cluster.nodes}
    for a in assignments:
        node = nodes[a.node]
        for resource, amount in requests[a.pod_set].items():
            node.free[resource] = node.free.get(resource, 0) - amount * a.count
            cluster.took(resource, amount * a.count)


def place_batch(
    jobs: Iterable[JobRequest], clusters: Sequence[ClusterView], weights: Weights = Weights()
) -> list[Decision]:
    """Place jobs in priority then submission order, deducting capacity as it goes.

    Works on copies: a job placed earlier in the batch reduces what later jobs see, so
    capacity is never promised twice. A job that fits nowhere does not block later ones.
    """
    working = [c.copy() for c in clusters]
    by_name = {c.name: c for c in working}
    decisions: list[Decision] = []
    for job in sorted(jobs, key=lambda j: (-j.priority, j.seq, j.id)):
        verdicts = best_verdicts(job, working, weights)
        best = verdicts[0] if verdicts and verdicts[0].feasible else None
        if best is not None:
            deduct(by_name[best.cluster], job, best.assignments)
        decisions.append(Decision(job.id, best.cluster if best else None, verdicts))
    return decisions
