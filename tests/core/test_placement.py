"""Example-based tests of placement: each asserts a decision or an explanation a user relies on."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TypedDict, TypeVar, Unpack

import pytest

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
from fedplane.core.placement import Decision, Verdict, Weights, evaluate, fit_gang, place_batch

CPU = "cpu"
MEM = "memory"
GPU = "nvidia.com/gpu"
GiB = 2**30


def node(
    name: str,
    cpu: int = 8,
    mem_gib: int = 32,
    gpu: int = 0,
    product: str = "",
    taints: tuple[Taint, ...] = (),
    schedulable: bool = True,
    alloc_cpu: int | None = None,
) -> NodeView:
    """A node with `cpu` whole cores free (allocatable defaults to free)."""
    free = {CPU: cpu * 1000, MEM: mem_gib * GiB}
    if gpu:
        free[GPU] = gpu
    allocatable = dict(free)
    if alloc_cpu is not None:
        allocatable[CPU] = alloc_cpu * 1000
    labels = {GPU_PRODUCT_LABEL: product} if product else {}
    return NodeView(name, free, allocatable, labels, taints, schedulable)


class ClusterFields(TypedDict, total=False):
    """ClusterView's fields after its nodes, to give `cluster()` by name."""

    labels: Mapping[str, str]
    taints: tuple[Taint, ...]
    datasets: Mapping[str, int]
    cost: float
    ready: bool
    cordoned: bool
    not_ready_reason: str


def cluster(name: str, *nodes: NodeView, **fields: Unpack[ClusterFields]) -> ClusterView:
    return ClusterView(name, list(nodes) or [node(f"{name}-n0")], **fields)


def pods(
    name: str = "main",
    count: int = 1,
    min_count: int = 0,
    cpu: int = 1,
    gpu: int = 0,
    gpu_type: str = "",
    mem_gib: int = 0,
) -> PodSetRequest:
    requests = {CPU: cpu * 1000}
    if gpu:
        requests[GPU] = gpu
    if mem_gib:
        requests[MEM] = mem_gib * GiB
    return PodSetRequest(name, count, min_count, requests, gpu_type)


class JobFields(TypedDict, total=False):
    """JobRequest's fields after its pod sets, to give `job()` by name."""

    priority: int
    seq: int
    cluster_selector: Mapping[str, str]
    tolerations: tuple[Toleration, ...]
    groups: tuple[ClusterGroup, ...]
    strict_groups: bool
    datasets: tuple[DatasetRequest, ...]


def job(*pod_sets: PodSetRequest, id: str = "job", **fields: Unpack[JobFields]) -> JobRequest:
    return JobRequest(id, pod_sets or (pods(),), **fields)


def verdict(verdicts: list[Verdict], name: str) -> Verdict:
    return next(v for v in verdicts if v.cluster == name)


T = TypeVar("T")


def only(items: Sequence[T]) -> T:
    assert len(items) == 1
    return items[0]


def per_node(assignments: list[Assignment]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in assignments:
        counts[a.node] = counts.get(a.node, 0) + a.count
    return counts


# -- gangs on real node shapes -----------------------------------------------------------------


def test_gang_fitting_the_aggregate_but_not_any_node_is_rejected_as_fragmented() -> None:
    # 4 nodes x 3 free cores = 12 cores in total; the gang needs 3 pods of 4 cores = 12 cores.
    c = cluster("a", *(node(f"n{i}", cpu=3) for i in range(4)))
    v = only(evaluate(job(pods(count=3, cpu=4)), [c]))
    assert not v.feasible
    assert v.assignments == []
    assert v.reasons == [
        "pod set main: only 0 of 3 pods fit on the nodes "
        "(enough capacity in total, but fragmented across nodes)"
    ]


def test_partly_fitting_fragmented_gang_reports_how_many_pods_fit() -> None:
    # Two nodes of 6 cores take one 4-core pod each; the third pod has no node.
    c = cluster("a", node("n0", cpu=6), node("n1", cpu=6))
    v = only(evaluate(job(pods(count=3, cpu=4)), [c]))
    assert not v.feasible
    assert "only 2 of 3 pods fit" in v.reasons[0]
    assert "fragmented" in v.reasons[0]


def test_gang_larger_than_the_cluster_is_rejected_as_insufficient_capacity() -> None:
    c = cluster("a", node("n0", cpu=4), node("n1", cpu=4))
    v = only(evaluate(job(pods(count=3, cpu=4)), [c]))
    assert v.reasons == ["pod set main: insufficient capacity (cpu 8000 free < 12000 needed)"]


def test_gang_that_fits_exactly_is_placed_using_all_free_capacity() -> None:
    c = cluster("a", node("n0", cpu=8, mem_gib=16), node("n1", cpu=8, mem_gib=16))
    v = only(evaluate(job(pods(count=4, cpu=4, mem_gib=8)), [c]))
    assert v.feasible and v.reasons == []
    assert per_node(v.assignments) == {"n0": 2, "n1": 2}
    # One more core per pod would not fit.
    assert not only(evaluate(job(pods(count=4, cpu=5, mem_gib=8)), [c])).feasible
    # Nor would one more byte of memory per pod.
    bigger = PodSetRequest("main", 4, 0, {CPU: 4000, MEM: 8 * GiB + 1})
    assert "memory" in only(evaluate(job(bigger), [c])).reasons[0]


def test_fit_gang_does_not_modify_the_cluster() -> None:
    c = cluster("a", node("n0", cpu=8))
    before = copy.deepcopy(c)
    assignments, misfit = fit_gang(job(pods(count=8)), c)
    assert misfit == "" and per_node(assignments) == {"n0": 8}
    assert c == before


def test_best_fit_fills_the_fullest_node_first_leaving_whole_nodes_free() -> None:
    c = cluster("a", node("big", cpu=16), node("small", cpu=2))
    v = only(evaluate(job(pods(count=2, cpu=1)), [c]))
    assert v.assignments == [Assignment("main", "small", 2)]


def test_small_gangs_leave_big_nodes_whole_for_later_big_gangs() -> None:
    clusters = [cluster("a", node("big", cpu=16), node("small", cpu=2))]
    jobs = [job(pods(count=2, cpu=1), id="small", seq=1), job(pods(cpu=16), id="whole-node", seq=2)]
    assert [d.cluster for d in place_batch(jobs, clusters)] == ["a", "a"]


def test_unschedulable_nodes_are_not_used() -> None:
    c = cluster("a", node("n0", cpu=16, schedulable=False), node("n1", cpu=2))
    v = only(evaluate(job(pods(count=3)), [c]))
    assert not v.feasible
    assert "insufficient capacity (cpu 2000 free < 3000 needed" in v.reasons[0]
    assert "1 of 2 nodes unusable" in v.reasons[0]


def test_every_pod_set_of_a_gang_must_fit_together() -> None:
    # The launcher and the workers share the only node: 1 + 3 cores fit, 1 + 4 do not.
    c = cluster("a", node("n0", cpu=4))
    fits = job(pods("launcher", cpu=1), pods("worker", count=3, cpu=1))
    assert per_node(only(evaluate(fits, [c])).assignments) == {"n0": 4}
    too_big = job(pods("launcher", cpu=1), pods("worker", count=4, cpu=1))
    v = only(evaluate(too_big, [c]))
    assert not v.feasible and v.assignments == []


# -- min_count ---------------------------------------------------------------------------------


def test_min_count_places_as_many_pods_as_fit_between_min_and_count() -> None:
    c = cluster("a", node("n0", cpu=4), node("n1", cpu=2))
    v = only(evaluate(job(pods(count=8, min_count=4)), [c]))
    assert v.feasible
    assert sum(a.count for a in v.assignments) == 6
    assert per_node(v.assignments) == {"n0": 4, "n1": 2}


def test_min_count_takes_all_of_count_when_there_is_room() -> None:
    c = cluster("a", node("n0", cpu=16))
    v = only(evaluate(job(pods(count=8, min_count=4)), [c]))
    assert sum(a.count for a in v.assignments) == 8


def test_fewer_pods_than_min_count_fitting_is_rejected() -> None:
    c = cluster("a", node("n0", cpu=3))
    v = only(evaluate(job(pods(count=8, min_count=4)), [c]))
    assert not v.feasible
    assert v.reasons == ["pod set main: insufficient capacity (cpu 3000 free < 4000 needed)"]


def test_zero_min_count_means_the_whole_count_is_required() -> None:
    c = cluster("a", node("n0", cpu=7))
    assert not only(evaluate(job(pods(count=8, min_count=0)), [c])).feasible


def test_elastic_pod_set_does_not_starve_another_pod_sets_required_pods() -> None:
    # "a" may shrink to 1 pod; "b" needs both of its pods. 4 cores hold 2 + 2, not 4 + 0.
    c = cluster("a", node("n0", cpu=4))
    v = only(evaluate(job(pods("a", count=4, min_count=1), pods("b", count=2)), [c]))
    assert v.feasible, v.reasons
    counts = {a.pod_set: a.count for a in v.assignments}
    assert counts == {"a": 2, "b": 2}


# -- GPU types ---------------------------------------------------------------------------------


def test_gpu_type_mismatch_names_the_types_the_cluster_has() -> None:
    c = cluster("a", node("n0", gpu=8, product="L4"), node("n1", gpu=8, product="A100"), node("n2"))
    v = only(evaluate(job(pods(gpu=1, gpu_type="H100")), [c]))
    assert v.reasons == ["pod set main: no node has GPU type H100 (cluster has A100, L4)"]


def test_gpu_type_on_a_cluster_without_gpus_says_so() -> None:
    v = only(evaluate(job(pods(gpu=1, gpu_type="H100")), [cluster("a", node("n0"))]))
    assert v.reasons == ["pod set main: no node has GPU type H100 (cluster has no GPUs)"]


def test_gpu_pods_go_only_to_nodes_of_the_requested_type() -> None:
    c = cluster("a", node("a100", gpu=8, product="A100"), node("h100", gpu=8, product="H100"))
    v = only(evaluate(job(pods(count=4, gpu=2, gpu_type="H100")), [c]))
    assert v.feasible
    assert per_node(v.assignments) == {"h100": 4}
    # Five such pods need 10 H100s: the A100 node's free GPUs do not count.
    v = only(evaluate(job(pods(count=5, gpu=2, gpu_type="H100")), [c]))
    assert not v.feasible
    assert "gpu 8 free < 10 needed" in v.reasons[0]
    assert "other GPU type" in v.reasons[0]


def test_gpu_without_type_may_use_any_gpu_node() -> None:
    c = cluster("a", node("a100", gpu=4, product="A100"), node("h100", gpu=4, product="H100"))
    v = only(evaluate(job(pods(count=8, gpu=1)), [c]))
    assert per_node(v.assignments) == {"a100": 4, "h100": 4}


# -- taints and tolerations --------------------------------------------------------------------

GPU_TAINT = Taint("nvidia.com/gpu", "present", "NoSchedule")


@pytest.mark.parametrize(
    ("tolerations", "tolerated"),
    [
        ((), False),
        ((Toleration("nvidia.com/gpu", "Equal", "present"),), True),
        ((Toleration("nvidia.com/gpu", "", "present"),), True),  # empty operator means Equal
        ((Toleration("nvidia.com/gpu", "Equal", "absent"),), False),
        ((Toleration("nvidia.com/gpu", "Exists"),), True),
        ((Toleration("other", "Exists"),), False),
        ((Toleration("", "Exists"),), True),  # empty key with Exists tolerates everything
        ((Toleration("", "Equal"),), False),
        ((Toleration("nvidia.com/gpu", "Exists", effect="NoSchedule"),), True),
        ((Toleration("nvidia.com/gpu", "Exists", effect="NoExecute"),), False),
        ((Toleration("", "Exists", effect="NoExecute"),), False),
        ((Toleration("other", "Exists"), Toleration("nvidia.com/gpu", "Exists")), True),
    ],
)
def test_node_taints_keep_pods_off_unless_tolerated(
    tolerations: tuple[Toleration, ...], tolerated: bool
) -> None:
    c = cluster("a", node("gpu-node", cpu=8, taints=(GPU_TAINT,)))
    v = only(evaluate(job(pods(count=2), tolerations=tolerations), [c]))
    assert v.feasible is tolerated
    if not tolerated:
        assert "1 of 1 nodes unusable: unschedulable or untolerated taint" in v.reasons[0]


def test_tainted_nodes_capacity_is_not_reported_as_fragmentation() -> None:
    # 8 free cores on a tainted node and 1 on a plain one: too little usable capacity, not fragmentation.
    c = cluster("a", node("tainted", cpu=8, taints=(GPU_TAINT,)), node("plain", cpu=1))
    v = only(evaluate(job(pods(count=2, cpu=2)), [c]))
    assert v.reasons == [
        "pod set main: insufficient capacity (cpu 1000 free < 4000 needed; "
        "1 of 2 nodes unusable: unschedulable or untolerated taint)"
    ]


def test_pods_avoid_tainted_nodes_when_untainted_ones_have_room() -> None:
    c = cluster("a", node("tainted", cpu=1, taints=(GPU_TAINT,)), node("plain", cpu=8))
    v = only(evaluate(job(pods(count=2)), [c]))
    assert per_node(v.assignments) == {"plain": 2}


@pytest.mark.parametrize("effect", ["PreferNoSchedule"])
def test_soft_taints_do_not_block(effect: str) -> None:
    taint = Taint("spot", "true", effect)
    c = cluster("a", node("n0", taints=(taint,)), taints=(taint,))
    assert only(evaluate(job(), [c])).feasible


NO_SCHEDULE = Taint("dedicated", "ml", "NoSchedule")
NO_EXECUTE = Taint("dedicated", "ml", "NoExecute")


@pytest.mark.parametrize(
    ("taint", "tolerations", "tolerated"),
    [
        (NO_SCHEDULE, (), False),
        (NO_EXECUTE, (), False),
        (NO_SCHEDULE, (Toleration("dedicated", "Equal", "ml"),), True),
        (NO_SCHEDULE, (Toleration("dedicated", "Equal", "web"),), False),
        (NO_SCHEDULE, (Toleration("dedicated", "Exists"),), True),
        (NO_EXECUTE, (Toleration("dedicated", "Exists", effect="NoSchedule"),), False),
        (NO_EXECUTE, (Toleration("dedicated", "Exists", effect="NoExecute"),), True),
        (NO_EXECUTE, (Toleration("dedicated", "Equal", "ml", "NoExecute"),), True),
        (NO_EXECUTE, (Toleration("", "Exists", effect="NoExecute"),), True),
    ],
)
def test_cluster_taints_exclude_the_cluster_unless_tolerated(
    taint: Taint, tolerations: tuple[Toleration, ...], tolerated: bool
) -> None:
    c = cluster("a", taints=(taint,))
    v = only(evaluate(job(tolerations=tolerations), [c]))
    assert v.feasible is tolerated
    if not tolerated:
        assert v.reasons == [f"cluster taint dedicated=ml:{taint.effect} not tolerated"]


def test_taint_text_round_trips_and_rejects_unknown_effects() -> None:
    assert Taint.parse("gpu=true:NoExecute") == Taint("gpu", "true", "NoExecute")
    assert Taint.parse("gpu") == Taint("gpu", "", "NoSchedule")
    assert str(Taint("gpu", "true", "NoExecute")) == "gpu=true:NoExecute"
    assert str(Taint("gpu")) == "gpu:NoSchedule"
    with pytest.raises(ValueError, match="invalid taint"):
        Taint.parse("gpu=true:Sometimes")
    with pytest.raises(ValueError, match="invalid taint"):
        Taint.parse("=x")


# -- cluster-level filters ---------------------------------------------------------------------


def test_cluster_selector_mismatch_explains_what_the_cluster_has() -> None:
    clusters = [
        cluster("us", labels={"region": "us"}),
        cluster("bare"),
        cluster("eu", labels={"region": "eu", "tier": "gold"}),
    ]
    verdicts = evaluate(job(cluster_selector={"region": "eu", "tier": "gold"}), clusters)
    assert verdicts[0].cluster == "eu" and verdicts[0].feasible
    assert verdict(verdicts, "us").reasons == [
        "selector region=eu not matched (cluster has region=us)",
        "selector tier=gold not matched (cluster has no tier label)",
    ]
    assert verdict(verdicts, "bare").reasons == [
        "selector region=eu not matched (cluster has no region label)",
        "selector tier=gold not matched (cluster has no tier label)",
    ]


def test_cordoned_and_not_ready_clusters_are_filtered_with_reasons() -> None:
    clusters = [
        cluster("cordoned", cordoned=True),
        cluster("down", ready=False, not_ready_reason="no heartbeat for 30s"),
        cluster("silent", ready=False),
        cluster("both", ready=False, cordoned=True),
        cluster("ok"),
    ]
    verdicts = evaluate(job(), clusters)
    assert [v.cluster for v in verdicts if v.feasible] == ["ok"]
    assert verdict(verdicts, "cordoned").reasons == ["cluster is cordoned"]
    assert verdict(verdicts, "down").reasons == ["cluster not ready: no heartbeat for 30s"]
    assert verdict(verdicts, "silent").reasons == ["cluster not ready"]
    assert verdict(verdicts, "both").reasons == ["cluster not ready", "cluster is cordoned"]


def test_filtered_cluster_is_not_considered_even_with_free_capacity() -> None:
    v = only(evaluate(job(), [cluster("a", cordoned=True)]))
    assert not v.feasible and v.assignments == []


def test_required_dataset_missing_filters_the_cluster() -> None:
    datasets = (DatasetRequest("imagenet", 100, required=True), DatasetRequest("extra", 10))
    clusters = [cluster("without"), cluster("with", datasets={"imagenet": 100})]
    verdicts = evaluate(job(datasets=datasets), clusters)
    assert verdict(verdicts, "without").reasons == ["required dataset imagenet not present"]
    assert verdict(verdicts, "with").feasible  # "extra" is optional


def test_optional_dataset_missing_everywhere_still_places() -> None:
    d = only(place_batch([job(datasets=(DatasetRequest("x", 10),))], [cluster("a")]))
    assert d.cluster == "a"


# -- scoring -----------------------------------------------------------------------------------


def test_data_locality_prefers_the_cluster_holding_more_of_the_jobs_bytes() -> None:
    datasets = (DatasetRequest("train", 900), DatasetRequest("eval", 100))
    clusters = [
        cluster("a", datasets={"eval": 100}),  # 10% of the bytes
        cluster("b", datasets={"train": 900}),  # 90%
        cluster("c", datasets={"train": 10**12}),  # more than needed counts as all of it
    ]
    verdicts = evaluate(job(datasets=datasets), clusters)
    locality = {v.cluster: v.score.data_locality for v in verdicts}
    assert locality == {"a": 0.1, "b": 0.9, "c": 0.9}
    assert verdict(verdicts, "b").score.total > verdict(verdicts, "a").score.total
    without_c = evaluate(job(datasets=datasets), clusters[:2])
    assert without_c[0].cluster == "b"


def test_cost_score_prefers_the_cheaper_cluster() -> None:
    verdicts = evaluate(job(), [cluster("a", cost=2.0), cluster("b", cost=1.0)])
    assert [v.cluster for v in verdicts] == ["b", "a"]
    assert verdict(verdicts, "b").score.cost == 1.0
    assert verdict(verdicts, "a").score.cost == 0.5


def test_cost_is_relative_to_the_cheapest_feasible_cluster() -> None:
    # The cheapest cluster is cordoned, so "a" is the cheapest that counts.
    clusters = [cluster("a", cost=2.0), cluster("b", cost=4.0), cluster("cheap", cost=0.5, cordoned=True)]
    verdicts = evaluate(job(), clusters)
    assert verdict(verdicts, "a").score.cost == 1.0
    assert verdict(verdicts, "b").score.cost == 0.5


def test_headroom_prefers_the_cluster_left_with_more_free_capacity() -> None:
    clusters = [
        cluster("busy", node("n0", cpu=8, alloc_cpu=16)),
        cluster("idle", node("n0", cpu=16, alloc_cpu=16)),
    ]
    verdicts = evaluate(job(pods(cpu=4)), clusters)
    assert verdicts[0].cluster == "idle"
    assert verdict(verdicts, "idle").score.headroom == 0.75  # (16 - 4) / 16
    assert verdict(verdicts, "busy").score.headroom == 0.25  # (8 - 4) / 16


def test_headroom_is_the_scarcest_requested_resource() -> None:
    c = cluster("a", node("n0", cpu=16, mem_gib=16))
    v = only(evaluate(job(pods(cpu=4, mem_gib=12)), [c]))
    assert v.score.headroom == 0.25  # memory: (16 - 12) / 16, cpu would be 0.75


def test_infeasible_clusters_are_listed_after_feasible_ones_with_zero_score() -> None:
    verdicts = evaluate(job(), [cluster("a", cordoned=True), cluster("b")])
    assert [(v.cluster, v.feasible) for v in verdicts] == [("b", True), ("a", False)]
    assert verdict(verdicts, "a").score.total == 0.0


# -- preferred groups --------------------------------------------------------------------------


def test_first_preferred_group_wins_even_with_a_lower_score() -> None:
    datasets = (DatasetRequest("train", 100),)
    clusters = [cluster("has-data", datasets={"train": 100}), cluster("preferred")]
    groups = (ClusterGroup(frozenset({"preferred"})), ClusterGroup(frozenset({"has-data"})))
    verdicts = evaluate(job(groups=groups, datasets=datasets), clusters)
    assert verdicts[0].cluster == "preferred"
    assert verdicts[0].score.total < verdict(verdicts, "has-data").score.total
    assert verdict(verdicts, "preferred").group_rank == 0
    assert verdict(verdicts, "has-data").group_rank == 1
    assert verdict(verdicts, "preferred").score.preference == 1.0
    assert verdict(verdicts, "has-data").score.preference == 0.5


def test_groups_can_match_clusters_by_label() -> None:
    clusters = [cluster("a", labels={"zone": "x"}), cluster("b", labels={"zone": "y"})]
    groups = (ClusterGroup(match_labels={"zone": "y"}),)
    d = only(place_batch([job(groups=groups)], clusters))
    assert d.cluster == "b"


def test_overflow_to_the_next_group_when_the_first_is_full() -> None:
    clusters = [
        cluster("first", node("n0", cpu=2)),
        cluster("second", node("n0", cpu=8)),
        cluster("outside", node("n0", cpu=64)),
    ]
    groups = (ClusterGroup(frozenset({"first"})), ClusterGroup(frozenset({"second"})))
    small, big = job(pods(cpu=1), groups=groups), job(pods(cpu=4), groups=groups)
    assert only(place_batch([small], clusters)).cluster == "first"
    assert only(place_batch([big], clusters)).cluster == "second"
    huge = job(pods(cpu=16), groups=groups)
    # Not strict: clusters outside every group are the last resort.
    assert only(place_batch([huge], clusters)).cluster == "outside"


def test_strict_groups_exclude_clusters_outside_all_groups() -> None:
    clusters = [cluster("in", node("n0", cpu=2)), cluster("out", node("n0", cpu=64))]
    groups = (ClusterGroup(frozenset({"in"})),)
    d = only(place_batch([job(pods(cpu=16), groups=groups, strict_groups=True)], clusters))
    assert d.cluster is None
    assert verdict(d.verdicts, "out").reasons == ["not in any preferred cluster group (strict)"]
    assert "insufficient capacity" in verdict(d.verdicts, "in").reasons[0]
    # The same job fits "in" when small enough; non-strict it may also go "out".
    assert only(place_batch([job(groups=groups, strict_groups=True)], clusters)).cluster == "in"
    assert only(place_batch([job(pods(cpu=16), groups=groups)], clusters)).cluster == "out"


# -- determinism -------------------------------------------------------------------------------


def test_ties_are_broken_by_cluster_name_whatever_the_input_order() -> None:
    names = ["charlie", "alpha", "bravo"]
    for order in (names, sorted(names), sorted(names, reverse=True)):
        verdicts = evaluate(job(), [cluster(n) for n in order])
        assert [v.cluster for v in verdicts] == ["alpha", "bravo", "charlie"]
        assert len({v.score.total for v in verdicts}) == 1


def test_same_input_gives_the_same_decision() -> None:
    def build() -> tuple[list[JobRequest], list[ClusterView]]:
        clusters = [
            cluster("a", node("n0", cpu=4), node("n1", cpu=6), cost=1.5),
            cluster("b", node("n0", cpu=12, gpu=4, product="A100"), datasets={"d": 5}),
        ]
        jobs = [
            job(pods(count=3, cpu=2), id="j1", seq=1),
            job(pods(gpu=2, gpu_type="A100"), id="j2", seq=2, datasets=(DatasetRequest("d", 10),)),
            job(pods(count=5, min_count=2, cpu=2), id="j3", seq=3),
        ]
        return jobs, clusters

    first = place_batch(*build())
    for _ in range(3):
        assert place_batch(*build()) == first


# -- batches -----------------------------------------------------------------------------------


def test_batch_places_higher_priority_first() -> None:
    clusters = [cluster("a", node("n0", cpu=4))]
    low = job(pods(cpu=4), id="low", priority=0, seq=1)
    high = job(pods(cpu=4), id="high", priority=10, seq=2)
    decisions = {d.job_id: d for d in place_batch([low, high], clusters)}
    assert decisions["high"].cluster == "a"
    assert decisions["low"].cluster is None
    assert "insufficient capacity (cpu 0 free < 4000 needed)" in decisions["low"].summary()


def test_batch_places_equal_priority_in_submission_order_whatever_the_input_order() -> None:
    clusters = [cluster("a", node("n0", cpu=4))]
    jobs = [job(pods(cpu=4), id=f"j{seq}", seq=seq) for seq in (3, 1, 2)]
    decisions = place_batch(jobs, clusters)
    assert [d.job_id for d in decisions] == ["j1", "j2", "j3"]
    assert [d.cluster for d in decisions] == ["a", None, None]


def test_a_job_that_fits_nowhere_does_not_block_later_ones() -> None:
    clusters = [cluster("a", node("n0", cpu=4))]
    jobs = [
        job(pods(cpu=64), id="huge", priority=5, seq=1),
        job(pods(cpu=2), id="small-1", seq=2),
        job(pods(cpu=2), id="small-2", seq=3),
        job(pods(cpu=2), id="small-3", seq=4),
    ]
    decisions = {d.job_id: d.cluster for d in place_batch(jobs, clusters)}
    assert decisions == {"huge": None, "small-1": "a", "small-2": "a", "small-3": None}


def test_batch_capacity_is_deducted_across_clusters_and_nodes() -> None:
    clusters = [cluster("a", node("n0", cpu=4), node("n1", cpu=4)), cluster("b", node("n0", cpu=4))]
    jobs = [job(pods(count=2, cpu=3), id=f"j{i}", seq=i) for i in range(3)]
    decisions = place_batch(jobs, clusters)
    assert [d.cluster for d in decisions] == ["a", None, None]
    assert "cpu 4000 free < 6000 needed" in verdict(decisions[1].verdicts, "b").reasons[0]
    assert "cpu 2000 free < 6000 needed" in verdict(decisions[1].verdicts, "a").reasons[0]


def test_place_batch_does_not_modify_its_input_clusters() -> None:
    clusters = [cluster("a", node("n0", cpu=8)), cluster("b", node("n0", cpu=8))]
    before = copy.deepcopy(clusters)
    decisions = place_batch([job(pods(count=8), id=f"j{i}", seq=i) for i in range(3)], clusters)
    assert [d.cluster for d in decisions] == ["a", "b", None]
    assert clusters == before


def test_empty_batch_and_no_clusters() -> None:
    assert place_batch([], [cluster("a")]) == []
    d = only(place_batch([job()], []))
    assert d.cluster is None and d.verdicts == []


# -- summaries ---------------------------------------------------------------------------------


def test_summary_of_a_placed_job_names_the_cluster_and_score() -> None:
    d = only(place_batch([job()], [cluster("a", cost=1.0)]))
    assert d.chosen is not None and d.chosen.cluster == "a"
    assert d.summary() == f"placed on a (score {d.chosen.score.total:.3f})"


def test_summary_with_no_clusters() -> None:
    assert Decision("j", None, []).summary() == "no clusters are registered"


def test_summary_when_every_cluster_fails_for_the_same_reason_says_so_once() -> None:
    d = only(place_batch([job()], [cluster("a", cordoned=True), cluster("b", cordoned=True)]))
    assert d.summary() == "no cluster fits: cluster is cordoned (all 2 clusters)"


def test_summary_lists_each_clusters_first_reason_by_name() -> None:
    clusters = [
        cluster("zeta", node("n0", gpu=8, product="A100")),
        cluster("alpha", ready=False, not_ready_reason="no heartbeat for 30s"),
        cluster("mid", labels={"region": "us"}),
    ]
    d = only(place_batch([job(pods(gpu=1, gpu_type="H100"), cluster_selector={"region": "us"})], clusters))
    assert d.cluster is None and d.chosen is None
    assert d.summary() == (
        "no cluster fits: alpha: cluster not ready: no heartbeat for 30s; "
        "mid: pod set main: no node has GPU type H100 (cluster has no GPUs); "
        "zeta: selector region=us not matched (cluster has no region label)"
    )


def test_summary_for_a_single_cluster_names_it() -> None:
    d = only(place_batch([job(pods(cpu=64))], [cluster("a", node("n0", cpu=8))]))
    assert d.summary() == (
        "no cluster fits: a: pod set main: insufficient capacity (cpu 8000 free < 64000 needed)"
    )


def test_scores_that_round_equal_tie_and_the_first_name_wins_even_behind_a_run_of_equal_clusters() -> None:
    # Scores are rounded to 6 places. "b" and "c" are alike; "a" has a slightly lower
    # unrounded score that rounds to theirs, so branch and bound reaches it after the run of
    # "b"-like clusters that only tie with "b" and lose on the name. "a" wins the tie.
    def one_node(name: str, free: int) -> ClusterView:
        return ClusterView(name, [NodeView(f"{name}-n0", {CPU: free}, {CPU: 10_000_000})])

    federation = [one_node("b", 5_000_001), one_node("c", 5_000_001), one_node("a", 5_000_000)]
    jobs = [JobRequest(f"j{i}", (PodSetRequest("w", 1, 0, {CPU: 1}),), seq=i) for i in range(2)]
    decisions = place_batch(jobs, federation, Weights(data_locality=0, headroom=1, cost=0, preference=0))
    assert [d.cluster for d in decisions] == ["a", "a"]
    assert all(d.chosen is not None and d.chosen.score.total == 0.5 for d in decisions)
