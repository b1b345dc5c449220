"""Property tests of placement over generated clusters and jobs."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedplane.core.model import (
    GPU_PRODUCT_LABEL,
    Assignment,
    ClusterGroup,
    ClusterView,
    DatasetRequest,
    JobRequest,
    NodeView,
    PodSetRequest,
    Taint,
    Toleration,
)
from fedplane.core.placement import Decision, Weights, best_verdicts, deducted, evaluate, place_batch

CPU, MEM, GPU = "cpu", "memory", "nvidia.com/gpu"
GiB = 2**30
PRODUCTS = ["A100", "H100", "L4"]
TAINTS = [
    Taint("gpu", "true", "NoSchedule"),
    Taint("spot", "", "NoExecute"),
    Taint("dedicated", "ml", "NoSchedule"),
    Taint("soft", "x", "PreferNoSchedule"),
]
TOLERATIONS = [
    Toleration("gpu", "Exists"),
    Toleration("gpu", "Equal", "false"),
    Toleration("spot", "Exists", effect="NoExecute"),
    Toleration("dedicated", "Equal", "ml"),
    Toleration("", "Exists", effect="NoSchedule"),
]


T = TypeVar("T")


def _subsets(items: Sequence[T], max_size: int) -> list[tuple[T, ...]]:
    result: list[tuple[T, ...]] = [()]
    for size in range(1, max_size + 1):
        result += [tuple(c) for c in itertools.combinations(items, size)]
    return result


# Precomputed choices keep each example to a few dozen draws: generation dominates the runtime.
NODE_TAINTS = _subsets(TAINTS, 2)
CLUSTER_TAINTS = _subsets(TAINTS, 1)
JOB_TOLERATIONS = _subsets(TOLERATIONS, 2)
LABEL_SETS = [{}, {"region": "eu"}, {"region": "us"}, {"region": "eu", "tier": "gold"}, {"tier": "silver"}]
SELECTORS: list[dict[str, str]] = [{}] * 6 + [
    {"region": "eu"},
    {"tier": "gold"},
    {"region": "us", "tier": "silver"},
]
HELD = [{}, {"d1": 100}, {"d1": 40, "d2": 100}, {"d2": 5, "d3": 100}, {"d1": 100, "d2": 100, "d3": 100}]
WANTED = [
    *[()] * 4,
    (DatasetRequest("d1", 100),),
    (DatasetRequest("d1", 50, required=True),),
    (DatasetRequest("d2", 80), DatasetRequest("d3", 20)),
    (DatasetRequest("d1", 0), DatasetRequest("d3", 60, required=True)),
]
GROUPS = [
    ClusterGroup(frozenset({"c0"})),
    ClusterGroup(frozenset({"c1", "c3"})),
    ClusterGroup(frozenset({"c4", "c9"})),
    ClusterGroup(match_labels={"region": "eu"}),
    ClusterGroup(match_labels={"region": "us", "tier": "silver"}),
]
GROUP_ORDERS = [tuple(p) for n in (1, 2, 3) for p in itertools.permutations(GROUPS, n)][::3]
GROUP_LISTS = [()] * len(GROUP_ORDERS) + GROUP_ORDERS

PROPERTIES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# A node's shape: free cpu cores, free memory GiB, GPUs, allocatable surplus (None = unknown),
# GPU product, taints, schedulable. Plain tuples draw several times faster than composites.
NodeShape = tuple[int, int, int, int | None, str, tuple[Taint, ...], bool]
# A cluster's shape: its nodes' shapes, labels, taints, datasets held, cost, ready, cordoned.
ClusterShape = tuple[list[NodeShape], dict[str, str], tuple[Taint, ...], dict[str, int], float, bool, bool]
NODE_SHAPES: st.SearchStrategy[NodeShape] = st.tuples(
    st.integers(0, 16),
    st.integers(0, 64),
    st.sampled_from([0, 0, 1, 2, 4, 8]),
    st.sampled_from([None, 0, 1, 4]),
    st.sampled_from(["", "", *PRODUCTS]),
    st.sampled_from([()] * 2 * len(NODE_TAINTS) + NODE_TAINTS),
    st.sampled_from([True] * 7 + [False]),  # schedulable
)
CLUSTER_SHAPES: st.SearchStrategy[ClusterShape] = st.tuples(
    st.lists(NODE_SHAPES, min_size=1, max_size=8),
    st.sampled_from(LABEL_SETS),
    st.sampled_from([()] * 3 * len(CLUSTER_TAINTS) + CLUSTER_TAINTS),
    st.sampled_from(HELD),
    st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    st.sampled_from([True] * 7 + [False]),  # ready
    st.sampled_from([False] * 7 + [True]),  # cordoned
)


def make_node(name: str, shape: NodeShape) -> NodeView:
    cpu, memory, gpu, extra, product, taints, schedulable = shape
    free = {CPU: cpu * 1000, MEM: memory * GiB}
    if gpu:
        free[GPU] = gpu
    # Allocatable is free plus what running pods use, or unknown.
    allocatable = {} if extra is None else {r: amount + extra * 1000 for r, amount in free.items()}
    labels = {GPU_PRODUCT_LABEL: product} if product else {}
    return NodeView(name, free, allocatable, labels, taints, schedulable)


def make_clusters(shapes: Sequence[ClusterShape]) -> list[ClusterView]:
    result = []
    for i, (node_shapes, labels, taints, held, cost, ready, cordoned) in enumerate(shapes):
        name = f"c{i}"
        node_list = [make_node(f"{name}-n{j}", shape) for j, shape in enumerate(node_shapes)]
        result.append(ClusterView(name, node_list, labels, taints, held, cost, ready, cordoned))
    return result


def clusters() -> st.SearchStrategy[list[ClusterView]]:
    # Shuffled, so that nothing relies on clusters arriving sorted by name.
    return st.lists(CLUSTER_SHAPES, min_size=1, max_size=5).map(make_clusters).flatmap(st.permutations)


# A pod set's shape: count, min_count as a fraction of count, cpu in half cores, memory GiB, GPUs and type.
PodSetShape = tuple[int, float, int, int, tuple[int, str]]
# A job's shape: its pod sets' shapes, priority, selector, tolerations, groups, strict groups, datasets.
JobShape = tuple[
    list[PodSetShape],
    int,
    dict[str, str],
    tuple[Toleration, ...],
    tuple[ClusterGroup, ...],
    bool,
    tuple[DatasetRequest, ...],
]
POD_SET_SHAPES: st.SearchStrategy[PodSetShape] = st.tuples(
    st.integers(1, 6),
    st.sampled_from([0.0, 0.0, 0.3, 0.5, 1.0]),
    st.integers(1, 6),
    st.sampled_from([0, 1, 4, 16]),
    st.sampled_from([(0, "")] * 6 + [(1, ""), (2, ""), *((1, p) for p in PRODUCTS)]),
)
JOB_SHAPES: st.SearchStrategy[JobShape] = st.tuples(
    st.lists(POD_SET_SHAPES, min_size=1, max_size=3),
    st.integers(0, 2),
    st.sampled_from(SELECTORS),
    st.sampled_from(JOB_TOLERATIONS),
    st.sampled_from(GROUP_LISTS),
    st.sampled_from([False] * 2 + [True]),  # strict groups
    st.sampled_from(WANTED),
)


def make_job(shape: JobShape, id: str = "job", seq: int = 0) -> JobRequest:
    set_shapes, priority, selector, tolerations, groups, strict, datasets = shape
    pod_sets = []
    for i, (count, min_fraction, half_cores, memory, (gpu, gpu_type)) in enumerate(set_shapes):
        requests = {CPU: half_cores * 500}
        if memory:
            requests[MEM] = memory * GiB
        if gpu:
            requests[GPU] = gpu
        pod_sets.append(PodSetRequest(f"ps{i}", count, round(count * min_fraction), requests, gpu_type))
    return JobRequest(id, tuple(pod_sets), priority, seq, selector, tolerations, groups, strict, datasets)


def jobs() -> st.SearchStrategy[JobRequest]:
    return JOB_SHAPES.map(make_job)


def make_batch(shapes: Sequence[JobShape], seqs: Sequence[int]) -> list[JobRequest]:
    return [make_job(shape, f"j{i}", seq) for i, (shape, seq) in enumerate(zip(shapes, seqs, strict=False))]


def batches() -> st.SearchStrategy[list[JobRequest]]:
    # Submission order (seq) is a permutation unrelated to the order jobs are handed over in.
    return st.lists(JOB_SHAPES, min_size=1, max_size=8).flatmap(
        lambda shapes: st.permutations(range(len(shapes))).map(lambda seqs: make_batch(shapes, seqs))
    )


def repeated_batches() -> st.SearchStrategy[list[JobRequest]]:
    """A few shapes, each several times in a batch: what placement keeps screenings across."""
    return st.tuples(
        st.lists(JOB_SHAPES, min_size=1, max_size=3), st.lists(st.integers(0, 2), min_size=2, max_size=14)
    ).map(
        lambda drawn: make_batch([drawn[0][i % len(drawn[0])] for i in drawn[1]], list(range(len(drawn[1]))))
    )


# Scores with and without a preference term, so that a later group's cluster often outscores
# an earlier group's: the group order must still win.
WEIGHTS = st.sampled_from(
    [Weights(), Weights(preference=0.0), Weights(data_locality=10.0, preference=0.0), Weights(0, 0, 1, 0)]
)


def blocked(taints: Iterable[Taint], tolerations: Iterable[Toleration]) -> bool:
    """An independent statement of Kubernetes taint/toleration matching."""

    def tolerates(tol: Toleration, taint: Taint) -> bool:
        if tol.effect not in ("", taint.effect):
            return False
        if tol.operator == "Exists":
            return tol.key in ("", taint.key)
        return tol.key == taint.key and tol.value == taint.value

    return any(
        t.effect in ("NoSchedule", "NoExecute") and not any(tolerates(tol, t) for tol in tolerations)
        for t in taints
    )


def check_fits(job: JobRequest, cluster: ClusterView, assignments: Sequence[Assignment]) -> None:
    """The assignments place every pod set's gang on nodes that can really take it."""
    nodes = {n.name: n for n in cluster.nodes}
    sets = {p.name: p for p in job.pod_sets}
    used: dict[str, dict[str, int]] = {}
    placed: dict[str, int] = dict.fromkeys(sets, 0)
    for a in assignments:
        assert a.count > 0
        node, pod_set = nodes[a.node], sets[a.pod_set]
        assert node.schedulable
        assert not blocked(node.taints, job.tolerations)
        if pod_set.gpu_type:
            assert node.labels.get(GPU_PRODUCT_LABEL) == pod_set.gpu_type
        placed[a.pod_set] += a.count
        for resource, amount in pod_set.requests.items():
            used.setdefault(a.node, {})[resource] = used.get(a.node, {}).get(resource, 0) + amount * a.count
    for name, resources in used.items():
        for resource, amount in resources.items():
            assert amount <= nodes[name].free.get(resource, 0), (name, resource)
    for name, pod_set in sets.items():
        assert (pod_set.min_count or pod_set.count) <= placed[name] <= pod_set.count, name


def cluster_level_ok(job: JobRequest, cluster: ClusterView) -> bool:
    """An independent statement of the cluster-level hard filters."""
    in_group = any(
        cluster.name in g.clusters
        or (g.match_labels and all(cluster.labels.get(k) == v for k, v in g.match_labels.items()))
        for g in job.groups
    )
    return (
        cluster.ready
        and not cluster.cordoned
        and all(cluster.labels.get(k) == v for k, v in job.cluster_selector.items())
        and not blocked(cluster.taints, job.tolerations)
        and (not job.strict_groups or not job.groups or in_group)
        and all(d.id in cluster.datasets for d in job.datasets if d.required)
    )


def expected_rank(job: JobRequest, cluster: ClusterView) -> int:
    for i, g in enumerate(job.groups):
        if cluster.name in g.clusters or (
            g.match_labels and all(cluster.labels.get(k) == v for k, v in g.match_labels.items())
        ):
            return i
    return len(job.groups)


def node_usage(
    decisions: Iterable[tuple[JobRequest, str, Sequence[Assignment]]],
) -> dict[tuple[str, str], dict[str, int]]:
    used: dict[tuple[str, str], dict[str, int]] = {}
    for job, cluster, assignments in decisions:
        requests = {p.name: p.requests for p in job.pod_sets}
        for a in assignments:
            node_used = used.setdefault((cluster, a.node), {})
            for resource, amount in requests[a.pod_set].items():
                node_used[resource] = node_used.get(resource, 0) + amount * a.count
    return used


@PROPERTIES
@given(clusters(), jobs())
def test_a_feasible_gang_fits_on_real_nodes(cluster_list: list[ClusterView], job: JobRequest) -> None:
    by_name = {c.name: c for c in cluster_list}
    for v in evaluate(job, cluster_list):
        if v.feasible:
            check_fits(job, by_name[v.cluster], v.assignments)
        else:
            assert v.assignments == []


@PROPERTIES
@given(clusters(), batches())
def test_capacity_is_never_double_booked_across_a_batch(
    cluster_list: list[ClusterView], batch: list[JobRequest]
) -> None:
    by_job = {j.id: j for j in batch}
    decisions = place_batch(batch, cluster_list)
    assert sorted(d.job_id for d in decisions) == sorted(by_job)
    placed = [
        (by_job[d.job_id], d.cluster, d.chosen.assignments)
        for d in decisions
        if d.cluster is not None and d.chosen is not None
    ]
    for job, _cluster, assignments in placed:
        assert assignments or not any(p.count for p in job.pod_sets)
    free = {(c.name, n.name): n.free for c in cluster_list for n in c.nodes}
    for key, resources in node_usage(placed).items():
        for resource, amount in resources.items():
            assert amount <= free[key].get(resource, 0), (key, resource)


@PROPERTIES
@given(clusters(), jobs())
def test_infeasible_verdicts_have_reasons_and_feasible_ones_none(
    cluster_list: list[ClusterView], job: JobRequest
) -> None:
    verdicts = evaluate(job, cluster_list)
    assert sorted(v.cluster for v in verdicts) == sorted(c.name for c in cluster_list)
    for v in verdicts:
        if v.feasible:
            assert v.reasons == []
            assert v.assignments
        else:
            assert v.reasons and all(isinstance(r, str) and r for r in v.reasons)
            assert v.score.total == 0.0


@PROPERTIES
@given(clusters(), batches())
def test_place_batch_is_deterministic_and_leaves_its_inputs_alone(
    cluster_list: list[ClusterView], batch: list[JobRequest]
) -> None:
    clusters_before, batch_before = copy.deepcopy(cluster_list), copy.deepcopy(batch)
    first = place_batch(batch, cluster_list)
    assert cluster_list == clusters_before
    assert batch == batch_before
    assert place_batch(batch, cluster_list) == first
    # Neither the order the clusters nor the order the jobs arrive in matters.
    by_name = sorted(cluster_list, key=lambda c: c.name)
    assert place_batch(list(reversed(batch)), by_name) == first
    assert [d.summary() for d in place_batch(batch, by_name)] == [d.summary() for d in first]


@PROPERTIES
@given(clusters(), jobs(), WEIGHTS)
def test_placement_picks_the_best_feasible_cluster(
    cluster_list: list[ClusterView], job: JobRequest, weights: Weights
) -> None:
    by_name = {c.name: c for c in cluster_list}
    (decision,) = place_batch([job], cluster_list, weights)
    verdicts = decision.verdicts
    feasible = [v for v in verdicts if v.feasible]
    for v in verdicts:
        assert v.group_rank == expected_rank(job, by_name[v.cluster])
        if not cluster_level_ok(job, by_name[v.cluster]):
            assert not v.feasible
    if not feasible:
        assert decision.cluster is None
        assert decision.summary().startswith("no cluster fits: ")
        return
    chosen = decision.chosen
    assert chosen is not None and chosen.feasible
    assert cluster_level_ok(job, by_name[chosen.cluster])
    best = min(feasible, key=lambda v: (v.group_rank, -v.score.total, v.cluster))
    assert chosen.cluster == best.cluster
    assert decision.summary().startswith(f"placed on {chosen.cluster} ")
    # The feasible verdicts come first and in preference order.
    assert verdicts[: len(feasible)] == sorted(
        feasible, key=lambda v: (v.group_rank, -v.score.total, v.cluster)
    )


@PROPERTIES
@given(clusters(), jobs(), WEIGHTS)
def test_branch_and_bound_chooses_what_a_full_evaluation_chooses(
    cluster_list: list[ClusterView], job: JobRequest, weights: Weights
) -> None:
    full = evaluate(job, cluster_list, weights)
    (decision,) = place_batch([job], cluster_list, weights)
    if not full[0].feasible:
        assert decision.cluster is None
        assert sorted(v.cluster for v in decision.verdicts) == sorted(v.cluster for v in full)
        return
    assert decision.cluster == full[0].cluster
    chosen = decision.chosen
    assert chosen is not None
    assert chosen.score == full[0].score and chosen.assignments == full[0].assignments


@PROPERTIES
@given(clusters(), repeated_batches(), WEIGHTS)
def test_each_job_of_a_batch_gets_the_verdicts_of_a_fresh_placement_on_the_views_left_to_it(
    cluster_list: list[ClusterView], batch: list[JobRequest], weights: Weights
) -> None:
    # place_batch keeps each shape's screening, tight bounds and packings across the batch,
    # re-screening only the clusters earlier jobs went to; placing each job from scratch on
    # the deducted views must decide the same, with the same verdicts.
    working = list(cluster_list)
    expected = []
    for job in sorted(batch, key=lambda j: (-j.priority, j.seq, j.id)):
        verdicts = best_verdicts(job, working, weights)
        cluster = verdicts[0].cluster if verdicts and verdicts[0].feasible else None
        if cluster is not None:
            at = next(i for i, c in enumerate(working) if c.name == cluster)
            working[at] = deducted(working[at], job, verdicts[0].assignments)
        expected.append(Decision(job.id, cluster, verdicts))
    assert place_batch(batch, cluster_list, weights) == expected
