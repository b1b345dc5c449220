"""Copy-on-write placement and its caches decide exactly like plain placement over full copies.

place_batch shares the views it is given (copying a cluster only when a job goes there) and
memoizes per-view results across calls; the reference here is the straightforward algorithm:
evaluate() every job over deep copies, deducting in place.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedplane.core.model import Assignment, ClusterView, Fits, JobRequest, NodeView, PodSetRequest
from fedplane.core.placement import (
    Decision,
    Weights,
    best_verdicts,
    deduct,
    deducted,
    evaluate,
    place_batch,
)
from tests.core.test_placement_properties import (
    CLUSTER_SHAPES,
    PROPERTIES,
    WEIGHTS,
    ClusterShape,
    NodeShape,
    batches,
    clusters,
    make_clusters,
)


def _alike(templates: Sequence[ClusterShape], picks: Sequence[tuple[int, int]]) -> list[ClusterView]:
    shapes: list[ClusterShape] = []
    for template, fewer_cores in picks:
        shape = templates[template % len(templates)]
        node_shapes = shape[0]
        first: NodeShape = (max(0, node_shapes[0][0] - fewer_cores), *node_shapes[0][1:])
        shapes.append(([first, *node_shapes[1:]], *shape[1:]))
    return make_clusters(shapes)


def alike_clusters() -> st.SearchStrategy[list[ClusterView]]:
    """Many clusters made from one to three shapes, some a core or two short: equal and nearly
    equal bounds and scores everywhere, which branch and bound must break exactly like a full
    evaluation (by name)."""
    picks = st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0, 0, 0, 1, 2])), min_size=2, max_size=10)
    return (
        st.tuples(st.lists(CLUSTER_SHAPES, min_size=1, max_size=3), picks)
        .map(lambda drawn: _alike(*drawn))
        .flatmap(st.permutations)
    )


def reference_place(
    jobs: Sequence[JobRequest], clusters: Sequence[ClusterView], weights: Weights
) -> list[Decision]:
    """place_batch as the simplest code says it: full evaluation over full, cache-free copies."""
    working = {c.name: fresh(c) for c in clusters}
    ordered = [working[c.name] for c in clusters]
    decisions = []
    for job in sorted(jobs, key=lambda j: (-j.priority, j.seq, j.id)):
        verdicts = evaluate(job, ordered, weights)
        best = verdicts[0] if verdicts and verdicts[0].feasible else None
        if best is not None:
            deduct(working[best.cluster], job, best.assignments)
        decisions.append(Decision(job.id, best.cluster if best else None, verdicts))
    return decisions


def fresh(cluster: ClusterView) -> ClusterView:
    """The same cluster as a new view without any cache."""
    nodes = [
        NodeView(n.name, dict(n.free), dict(n.allocatable), dict(n.labels), n.taints, n.schedulable)
        for n in cluster.nodes
    ]
    return ClusterView(
        cluster.name,
        nodes,
        dict(cluster.labels),
        cluster.taints,
        dict(cluster.datasets),
        cluster.cost,
        cluster.ready,
        cluster.cordoned,
        cluster.not_ready_reason,
    )


def assert_same_decisions(actual: list[Decision], expected: list[Decision]) -> None:
    assert [d.job_id for d in actual] == [d.job_id for d in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got.cluster == want.cluster, got.job_id
        if want.cluster is not None:
            assert got.chosen is not None and want.chosen is not None
            assert got.chosen.score == want.chosen.score
            assert got.chosen.assignments == want.chosen.assignments
        else:
            # Nothing fits: every cluster's verdict and reasons, as a full evaluation gives them.
            assert got.verdicts == want.verdicts
            assert got.summary() == want.summary()


def assert_caches_right(cluster: ClusterView) -> None:
    plain = fresh(cluster)
    for which in ("free", "allocatable"):
        assert cluster.total(which) == plain.total(which), which
    # Room is only ever read with .get(resource, 0): zero entries may come and go.
    assert {r: a for r, a in cluster.room().items() if a} == {r: a for r, a in plain.room().items() if a}


@PROPERTIES
@given(st.one_of(clusters(), alike_clusters()), batches(), WEIGHTS)
def test_copy_on_write_place_batch_decides_like_full_copies_and_leaves_views_alone(
    cluster_list: list[ClusterView], batch: list[JobRequest], weights: Weights
) -> None:
    before = copy.deepcopy(cluster_list)
    expected = reference_place(batch, before, weights)
    assert_same_decisions(place_batch(batch, cluster_list, weights), expected)
    assert cluster_list == before, "place_batch modified the views it was given"
    # Again on the same views, now carrying totals, node indexes and memos from the first call.
    assert_same_decisions(place_batch(batch, cluster_list, weights), expected)
    assert cluster_list == before
    for cluster in cluster_list:
        assert_caches_right(cluster)


@PROPERTIES
@given(st.one_of(clusters(), alike_clusters()), batches(), WEIGHTS, st.data())
def test_views_derived_copy_on_write_or_in_place_place_like_fresh_ones(
    cluster_list: list[ClusterView], batch: list[JobRequest], weights: Weights, data: st.DataObject
) -> None:
    """Deducting through deducted() (the registry and place_batch) or copy() + deduct() (the
    pending queue) keeps every cache right: later placements decide as on cache-free views."""
    by_copy = [c.copy() for c in cluster_list]
    for job in batch:
        best_verdicts(job, cluster_list, weights)  # warm the caches of the views about to change
        verdicts = best_verdicts(job, by_copy, weights)
        if not verdicts or not verdicts[0].feasible:
            continue
        chosen = verdicts[0]
        i = next(i for i, c in enumerate(cluster_list) if c.name == chosen.cluster)
        if data.draw(st.booleans(), label="copy-on-write"):
            cluster_list[i] = deducted(cluster_list[i], job, chosen.assignments)
        else:
            cluster_list[i] = cluster_list[i].copy()
            deduct(cluster_list[i], job, chosen.assignments)
        deduct(by_copy[i], job, chosen.assignments)
        assert cluster_list[i] == by_copy[i]
        assert_caches_right(cluster_list[i])
        assert_caches_right(by_copy[i])
    plain = [fresh(c) for c in cluster_list]
    assert_same_decisions(place_batch(batch, cluster_list, weights), reference_place(batch, plain, weights))
    assert_same_decisions(place_batch(batch, by_copy, weights), reference_place(batch, plain, weights))


def test_deducted_copies_only_the_nodes_it_changes() -> None:
    nodes = [NodeView(f"n{i}", {"cpu": 8000}, {"cpu": 8000}) for i in range(3)]
    cluster = ClusterView("a", nodes)
    assert cluster.total("free") == {"cpu": 24000}
    job = JobRequest("j", (PodSetRequest("w", 2, 0, {"cpu": 1000}),))
    after = deducted(cluster, job, [Assignment("w", "n1", 2)])
    assert after.nodes[0] is nodes[0] and after.nodes[2] is nodes[2]
    assert after.nodes[1] is not nodes[1] and after.nodes[1].free == {"cpu": 6000}
    assert nodes[1].free == {"cpu": 8000}
    assert after.total("free") == {"cpu": 22000} and cluster.total("free") == {"cpu": 24000}


def test_a_tie_in_rounded_score_goes_to_the_first_name_even_when_its_bound_is_lower() -> None:
    # b's headroom is higher by 1e-7, so b is packed first, but the scores round alike and a
    # comes first by name: branch and bound must not stop at b.
    a = ClusterView("a", [NodeView("n", {"cpu": 5_000_000}, {"cpu": 10_000_000})])
    b = ClusterView("b", [NodeView("n", {"cpu": 5_000_001}, {"cpu": 10_000_000})])
    job = JobRequest("j", (PodSetRequest("w", 1, 0, {"cpu": 1000}),))
    full = evaluate(job, [a, b])
    assert full[0].score == full[1].score and full[0].cluster == "a"
    assert place_batch([job], [b, a])[0].cluster == "a"


def test_a_deducted_view_keeps_its_best_fit_lists_instead_of_rescanning_the_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Placement cost must not grow with the cluster's size: after the first job of a shape,
    the next jobs of a batch reuse the best-fit list carried (and updated) to the deducted view."""
    cluster = ClusterView("a", [NodeView(f"n{i}", {"cpu": 8000}, {"cpu": 8000}) for i in range(50)])
    job = JobRequest("j", (PodSetRequest("w", 3, 0, {"cpu": 1000}),))
    first = best_verdicts(job, [cluster])[0]
    after = deducted(cluster, job, first.assignments)
    scans: list[int] = []
    real = Fits.of

    def counting(nodes: list[NodeView], positions: list[int], wanted: tuple[tuple[str, int], ...]) -> Fits:
        scans.append(1)
        return real(nodes, positions, wanted)

    monkeypatch.setattr(Fits, "of", counting)
    second = best_verdicts(job, [after])[0]
    assert scans == []
    # The carried list is the one a scan would give: the node the first job used is fullest.
    assert second.assignments == [Assignment("w", first.assignments[0].node, 3)]
    (carried,) = after._fits.values()
    assert carried.entries == real(after.nodes, sorted(carried.positions), carried.wanted).entries
