"""The pending queue: the same placements as place_batch, at the cost of placements, not queue length."""

from __future__ import annotations

import copy
import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from fedplane.core.model import ClusterView, JobRequest, NodeView, PodSetRequest
from fedplane.core.pending import PendingQueue
from fedplane.core.placement import Decision, Weights, deduct, place_batch
from tests.core.test_placement_properties import (
    JOB_SHAPES,
    PROPERTIES,
    WEIGHTS,
    JobShape,
    check_fits,
    clusters,
    make_job,
)


def cpu_job(job_id: str, cores: int, seq: int, priority: int = 0, pods: int = 1) -> JobRequest:
    return JobRequest(job_id, (PodSetRequest("w", pods, pods, {"cpu": cores * 1000}),), priority, seq)


def one_cluster(cores: int, name: str = "c") -> list[ClusterView]:
    return [ClusterView(name, [NodeView("n", {"cpu": cores * 1000}, {"cpu": cores * 1000})])]


def queued(*jobs: JobRequest) -> PendingQueue:
    queue = PendingQueue()
    for job in jobs:
        queue.add(job)
    return queue


# Jobs whose pod sets all place all-or-nothing: for them a misfit of one job of a shape means
# a misfit of all later ones in the cycle, so the queue must decide exactly like place_batch.
@given(
    clusters(),
    st.lists(st.tuples(JOB_SHAPES, st.integers(0, 3)), min_size=1, max_size=12),
    WEIGHTS,
)
@PROPERTIES
def test_a_cycle_places_exactly_what_place_batch_places(
    cluster_list: list[ClusterView],
    drawn: list[tuple[JobShape, int]],
    weights: Weights,
) -> None:
    jobs = []
    for i, (shape, copies) in enumerate(drawn):
        # Several jobs of one shape, as a deep queue has.
        for c in range(copies + 1):
            job = make_job(shape, f"j{i}-{c}", seq=i * 10 + c)
            gangs = tuple(
                PodSetRequest(p.name, p.count, p.count, p.requests, p.gpu_type) for p in job.pod_sets
            )
            jobs.append(dataclasses.replace(job, pod_sets=gangs[:1]))
    before = copy.deepcopy(cluster_list)
    expected = {d.job_id: d.cluster for d in place_batch(jobs, cluster_list, weights) if d.cluster}
    queue = queued(*jobs)
    placed = queue.cycle(cluster_list, weights, limit=len(jobs))
    assert {d.job_id: d.cluster for _, d in placed} == expected
    assert cluster_list == before, "the caller's cluster views were modified"
    assert len(queue) == len(jobs) - len(expected)
    # Every placement fits, counting what earlier placements of the cycle took.
    working = {c.name: copy.deepcopy(c) for c in cluster_list}
    for request, decision in placed:
        assert decision.cluster is not None and decision.chosen is not None
        check_fits(request, working[decision.cluster], decision.chosen.assignments)
        deduct(working[decision.cluster], request, decision.chosen.assignments)


def test_jobs_go_by_priority_then_submission_order_and_the_limit_holds() -> None:
    queue = queued(
        cpu_job("late", 1, seq=3), cpu_job("urgent", 1, seq=9, priority=5), cpu_job("early", 1, seq=1)
    )
    placed = queue.cycle(one_cluster(64), Weights(), limit=2)
    assert [d.job_id for _, d in placed] == ["urgent", "early"]
    assert list(queue) == ["late"]
    assert [d.job_id for _, d in queue.cycle(one_cluster(64), Weights(), limit=10)] == ["late"]
    assert len(queue) == 0


def test_a_shape_that_fits_nowhere_is_not_tried_again_until_unblocked() -> None:
    big = [cpu_job(f"big{i}", 100, seq=i) for i in range(1000)]
    small = cpu_job("small", 1, seq=5000)
    queue = queued(*big, small)
    cluster = one_cluster(8)
    placed = queue.cycle(cluster, Weights(), limit=100)
    # The big shape was tried once, not 1000 times; the small job behind it was not held up.
    assert [d.job_id for _, d in placed] == ["small"]
    misfit = queue.misfit("big999")
    assert isinstance(misfit, Decision) and misfit.job_id == "big0"
    assert "insufficient capacity" in misfit.summary()
    # Nothing changed: the next cycle does not look at the blocked shape at all.
    assert queue.cycle(cluster, Weights(), limit=100) == []
    # New capacity: unblock, and the head of the shape goes first.
    queue.unblock()
    placed = queue.cycle(one_cluster(250), Weights(), limit=100)
    assert [d.job_id for _, d in placed] == ["big0", "big1"]
    assert queue.misfit("big2") is not None  # the third did not fit: blocked again


def test_discarded_jobs_are_skipped_and_readding_keeps_one_entry() -> None:
    queue = queued(*(cpu_job(f"j{i}", 1, seq=i) for i in range(5)))
    assert queue.discard("j0") and queue.discard("j3")
    assert not queue.discard("j3")
    queue.add(cpu_job("j1", 1, seq=1))  # already queued: no second entry
    placed = queue.cycle(one_cluster(64), Weights(), limit=10)
    assert [d.job_id for _, d in placed] == ["j1", "j2", "j4"]
    assert len(queue) == 0 and queue.shapes == 0


def test_jobs_that_differ_only_in_who_and_when_share_a_shape() -> None:
    queue = queued(cpu_job("a", 2, seq=7, priority=3), cpu_job("b", 2, seq=8))
    assert queue.shapes == 1
    queue.add(cpu_job("c", 3, seq=9))
    assert queue.shapes == 2
