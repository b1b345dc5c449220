"""The preemption planner: whom to evict, on which one cluster, so that a pending gang runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedplane.core.model import Assignment, ClusterView, JobRequest, NodeView, PodSetRequest
from fedplane.core.placement import evaluate
from fedplane.core.preemption import (
    Candidate,
    Eviction,
    Plan,
    Reason,
    RunningIndex,
    RunningJob,
    fair_share_allows,
    less_than_initial_share,
    plan,
    strictly_lower,
)

CPU, MEM = "cpu", "memory"
MayEvict = Callable[[RunningJob], Reason | None]
QuotaFits = Callable[[Sequence[RunningJob]], bool]


def running(
    job_id: str,
    cluster: str,
    pods: Mapping[str, int],
    cpu: int,
    priority: int = 0,
    seq: int = 0,
    queue: str = "team",
    *,
    started_at: float = 0.0,
    min_run_seconds: float = 0.0,
    interruptible: bool = False,
    borrowing: bool = False,
) -> RunningJob:
    """A one-pod-set job with `pods[node]` pods of `cpu` each on the cluster's nodes."""
    return RunningJob(
        job_id,
        queue,
        cluster,
        priority,
        seq,
        tuple(Assignment("worker", node, count) for node, count in pods.items()),
        {"worker": {CPU: cpu}},
        started_at,
        min_run_seconds,
        interruptible,
        borrowing,
    )


def cluster(
    name: str, nodes: Mapping[str, int], jobs: Sequence[RunningJob], cordoned: bool = False
) -> ClusterView:
    """A cluster of `nodes[name]` cpus each, whose free capacity is what `jobs` leave."""
    free = dict(nodes)
    for job in jobs:
        if job.cluster == name:
            for a in job.assignments:
                free[a.node] -= job.requests[a.pod_set][CPU] * a.count
    return ClusterView(
        name, [NodeView(n, {CPU: free[n]}, {CPU: cpu}) for n, cpu in nodes.items()], cordoned=cordoned
    )


def gang(job_id: str, pods: int, cpu: int, priority: int, min_count: int = 0) -> JobRequest:
    return JobRequest(job_id, (PodSetRequest("worker", pods, min_count, {CPU: cpu}),), priority)


def same_queue_lower_priority(candidate: Candidate) -> MayEvict:
    def may_evict(job: RunningJob) -> Reason | None:
        if job.queue == candidate.queue and job.priority < candidate.job.priority:
            return Reason.PRIORITY
        return None

    return may_evict


def interruptible_or_lower_priority(candidate: Candidate) -> MayEvict:
    lower = same_queue_lower_priority(candidate)
    return lambda job: Reason.INTERRUPTIBLE if job.interruptible else lower(job)


def always(_: Sequence[RunningJob]) -> bool:
    return True


def victims(result: Plan | None) -> list[str]:
    assert result is not None
    return [e.job_id for e in result.evictions]


# Examples


def test_a_high_priority_gang_evicts_only_the_lowest_job_it_needs() -> None:
    jobs = [
        running("low", "c1", {"n1": 1}, 4, priority=1, seq=1),
        running("mid-a", "c1", {"n1": 1}, 2, priority=5, seq=2),
        running("mid-b", "c1", {"n1": 1}, 2, priority=5, seq=3),
    ]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    result = plan(
        candidate, [cluster("c1", {"n1": 8}, jobs)], jobs, same_queue_lower_priority(candidate), always, 0.0
    )
    assert result == Plan("c1", (Eviction("low", "c1", Reason.PRIORITY, "urgent", 1, 10, "team"),))


def test_a_gang_needing_two_nodes_evicts_on_one_cluster_only() -> None:
    # Each cluster has one free node: two nodes free across the federation, but a gang runs
    # in one cluster, so one job must go in one of them, the lower-priority one.
    jobs = [
        running("x1", "c1", {"b": 1}, 4, priority=3),
        running("x2", "c2", {"b": 1}, 4, priority=1),
    ]
    clusters = [cluster(c, {"a": 4, "b": 4}, jobs) for c in ("c1", "c2")]
    candidate = Candidate(gang("pair", 2, 4, priority=10), "team")
    result = plan(candidate, clusters, jobs, same_queue_lower_priority(candidate), always, 0.0)
    assert result is not None and result.cluster == "c2"
    assert [(e.job_id, e.cluster) for e in result.evictions] == [("x2", "c2")]

    # Equal victims: the cluster's name decides, deterministically.
    equal = [running("x1", "c1", {"b": 1}, 4, priority=1), running("x2", "c2", {"b": 1}, 4, priority=1)]
    clusters = [cluster(c, {"a": 4, "b": 4}, equal) for c in ("c2", "c1")]
    result = plan(candidate, clusters, equal, same_queue_lower_priority(candidate), always, 0.0)
    assert result is not None and [(e.job_id, e.cluster) for e in result.evictions] == [("x1", "c1")]


def test_a_gang_split_across_clusters_is_never_planned() -> None:
    # Evicting one job in each cluster would free two nodes, but not in one cluster.
    jobs = [
        running("x1", "c1", {"a": 1}, 4, priority=1),
        running("keep1", "c1", {"b": 1}, 4, priority=10),
        running("x2", "c2", {"a": 1}, 4, priority=1),
        running("keep2", "c2", {"b": 1}, 4, priority=10),
    ]
    clusters = [cluster(c, {"a": 4, "b": 4}, jobs) for c in ("c1", "c2")]
    candidate = Candidate(gang("pair", 2, 4, priority=10), "team")
    assert plan(candidate, clusters, jobs, same_queue_lower_priority(candidate), always, 0.0) is None


def test_min_run_seconds_protects_a_job_until_its_time() -> None:
    jobs = [running("young", "c1", {"n1": 1}, 4, priority=1, started_at=100.0, min_run_seconds=60.0)]
    clusters = [cluster("c1", {"n1": 4}, jobs)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    may_evict = same_queue_lower_priority(candidate)
    assert plan(candidate, clusters, jobs, may_evict, always, now=159.9) is None
    assert victims(plan(candidate, clusters, jobs, may_evict, always, now=160.0)) == ["young"]


def test_interruptible_jobs_go_first() -> None:
    jobs = [
        running("spot", "c1", {"n1": 1}, 4, priority=5, seq=1, interruptible=True),
        running("batch", "c1", {"n1": 1}, 4, priority=1, seq=2),
    ]
    clusters = [cluster("c1", {"n1": 8}, jobs)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    result = plan(candidate, clusters, jobs, interruptible_or_lower_priority(candidate), always, 0.0)
    assert result is not None
    assert [(e.job_id, e.reason) for e in result.evictions] == [("spot", Reason.INTERRUPTIBLE)]
    # Not interruptible, the same job would be spared for the lower-priority one.
    jobs[0] = running("spot", "c1", {"n1": 1}, 4, priority=5, seq=1)
    assert victims(
        plan(candidate, clusters, jobs, interruptible_or_lower_priority(candidate), always, 0.0)
    ) == ["batch"]


def test_a_needless_victim_is_dropped() -> None:
    # "tiny" comes first (lowest priority) but freeing its cpu on n1 does not make room for a
    # 4-cpu pod; "y" does, on n2, and then "tiny" is not needed.
    jobs = [
        running("tiny", "c1", {"n1": 1}, 1, priority=1, seq=9),
        running("keeper", "c1", {"n1": 1}, 3, priority=10, seq=1),
        running("y", "c1", {"n2": 1}, 4, priority=2, seq=2),
    ]
    clusters = [cluster("c1", {"n1": 4, "n2": 4}, jobs)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    assert victims(plan(candidate, clusters, jobs, same_queue_lower_priority(candidate), always, 0.0)) == [
        "y"
    ]


def test_the_budget_refuses_a_plan_that_is_too_large() -> None:
    jobs = [running("a", "c1", {"n1": 1}, 2, priority=1), running("b", "c1", {"n1": 1}, 2, priority=1, seq=1)]
    clusters = [cluster("c1", {"n1": 4}, jobs)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    may_evict = same_queue_lower_priority(candidate)
    assert plan(candidate, clusters, jobs, may_evict, always, 0.0, budget={"team": 1}.__getitem__) is None
    assert plan(candidate, clusters, jobs, may_evict, always, 0.0, budget={"team": 0}.__getitem__) is None
    assert sorted(victims(plan(candidate, clusters, jobs, may_evict, always, 0.0, budget=lambda q: 2))) == [
        "a",
        "b",
    ]


def test_a_candidate_that_may_not_preempt_gets_no_plan() -> None:
    jobs = [running("low", "c1", {"n1": 1}, 4, priority=1)]
    clusters = [cluster("c1", {"n1": 4}, jobs)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    assert plan(candidate, clusters, jobs, same_queue_lower_priority(candidate), always, 0.0) is not None
    waiting = Candidate(candidate.job, "team", may_preempt=False)
    assert plan(waiting, clusters, jobs, same_queue_lower_priority(waiting), always, 0.0) is None


def test_a_candidate_that_fits_somewhere_gets_no_plan() -> None:
    jobs = [running("low", "c1", {"n1": 1}, 4, priority=1)]
    clusters = [cluster("c1", {"n1": 4}, jobs), cluster("c2", {"n1": 4}, jobs)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    assert plan(candidate, clusters, jobs, same_queue_lower_priority(candidate), always, 0.0) is None


def test_a_queue_short_of_quota_reclaims_from_a_borrower_even_where_the_gang_fits() -> None:
    jobs = [
        running("lender-own", "c1", {"n1": 1}, 2, priority=1, queue="other"),
        running("borrowed", "c1", {"n1": 1}, 2, priority=5, queue="other", borrowing=True),
    ]
    clusters = [cluster("c1", {"n1": 4, "n2": 4}, jobs)]
    candidate = Candidate(gang("owner", 1, 4, priority=3), "team")

    def may_evict(job: RunningJob) -> Reason | None:
        return Reason.RECLAIM if job.queue != candidate.queue and job.borrowing else None

    def quota(evicted: Sequence[RunningJob]) -> bool:
        return any(job.borrowing for job in evicted)

    result = plan(candidate, clusters, jobs, may_evict, quota, 0.0)
    assert result is not None
    # A higher priority than the candidate's does not protect a borrower from a reclaim.
    assert [(e.job_id, e.reason) for e in result.evictions] == [("borrowed", Reason.RECLAIM)]
    assert plan(candidate, clusters, jobs, may_evict, lambda evicted: False, 0.0) is None


def test_a_priority_eviction_never_targets_an_equal_or_higher_priority() -> None:
    jobs = [
        running("peer", "c1", {"n1": 1}, 4, priority=10),
        running("senior", "c1", {"n2": 1}, 4, priority=11),
    ]
    clusters = [cluster("c1", {"n1": 4, "n2": 4}, jobs)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    # The policy wrongly offers every job: the plan still refuses.
    assert plan(candidate, clusters, jobs, lambda job: Reason.PRIORITY, always, 0.0) is None
    # Another reason is the caller's to judge.
    assert victims(plan(candidate, clusters, jobs, lambda job: Reason.FAIR_SHARE, always, 0.0)) == ["peer"]


def test_clusters_the_candidate_may_not_use_are_not_considered() -> None:
    jobs = [running("cheap", "c0", {"n1": 1}, 4, priority=0), running("dear", "c1", {"n1": 1}, 4, priority=5)]
    clusters = [cluster("c0", {"n1": 4}, jobs, cordoned=True), cluster("c1", {"n1": 4}, jobs)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    asked: list[str] = []

    def may_evict(job: RunningJob) -> Reason | None:
        asked.append(job.job_id)
        return Reason.PRIORITY

    assert victims(plan(candidate, clusters, jobs, may_evict, always, 0.0)) == ["dear"]
    assert asked == ["dear"]


def test_a_prebuilt_index_gives_the_same_plan() -> None:
    jobs = [running(f"j{i}", f"c{i % 3}", {"n1": 1}, 2, priority=i % 4, seq=i) for i in range(6)]
    clusters = [cluster(f"c{i}", {"n1": 4}, jobs) for i in range(3)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    may_evict = same_queue_lower_priority(candidate)
    from_sequence = plan(candidate, clusters, jobs, may_evict, always, 0.0)
    # Two jobs must go wherever it runs; c1's are of the lowest priorities (0 and 1).
    assert from_sequence is not None and from_sequence.cluster == "c1"
    assert victims(from_sequence) == ["j4", "j1"]
    assert plan(candidate, clusters, RunningIndex(jobs), may_evict, always, 0.0) == from_sequence


def test_an_index_built_on_the_last_rounds_sees_what_changed_since() -> None:
    jobs = [running(f"j{i}", f"c{i % 3}", {"n1": 1}, 2, priority=i % 4, seq=i) for i in range(6)]
    clusters = [cluster(f"c{i}", {"n1": 4}, jobs) for i in range(3)]
    candidate = Candidate(gang("urgent", 1, 4, priority=10), "team")
    may_evict = same_queue_lower_priority(candidate)
    first = RunningIndex(jobs)
    assert victims(plan(candidate, clusters, first, may_evict, always, 0.0)) == ["j4", "j1"]
    # j4 moved on to two nodes of c1 since (a new RunningJob): c1 is no longer the cheapest.
    moved = [*jobs[:4], running("j4", "c1", {"n1": 1, "n2": 1}, 2, priority=0, seq=4), jobs[5]]
    clusters = [cluster("c0", {"n1": 4}, moved), cluster("c1", {"n1": 4, "n2": 4}, moved), clusters[2]]
    again = plan(candidate, clusters, RunningIndex(moved, first), may_evict, always, 0.0)
    assert again == plan(candidate, clusters, moved, may_evict, always, 0.0)


def test_messages_say_who_preempted_and_why() -> None:
    assert (
        Eviction("low", "c1", Reason.PRIORITY, "X", priority=5, preemptor_priority=10).message()
        == "preempted by job X (priority 10 > 5) to run on cluster c1"
    )
    reclaim = Eviction("b", "c2", Reason.RECLAIM, "Y", preemptor_queue="research").message()
    assert reclaim.startswith("preempted by job Y of queue research to run on cluster c2: ")
    assert "borrowed" in reclaim
    assert "fair share" in Eviction("b", "c2", Reason.FAIR_SHARE, "Y").message()
    assert "interruptible" in Eviction("b", "c2", Reason.INTERRUPTIBLE, "Y").message()


@pytest.mark.parametrize(
    ("preemptor_after", "victim_before", "victim_after", "final_share", "initial_share"),
    [
        (0.3, 0.6, 0.4, True, True),
        (0.4, 0.6, 0.4, True, True),  # equal final shares: allowed (less than or equal)
        (0.5, 0.6, 0.4, False, True),  # the victim's queue would end below the preemptor's
        (0.6, 0.6, 0.2, False, False),
    ],
)
def test_fair_share_rules_follow_kueue(
    preemptor_after: float, victim_before: float, victim_after: float, final_share: bool, initial_share: bool
) -> None:
    assert fair_share_allows(preemptor_after, victim_before, victim_after) is final_share
    assert less_than_initial_share(preemptor_after, victim_before) is initial_share


def test_strictly_lower() -> None:
    assert strictly_lower(4, 5)
    assert not strictly_lower(5, 5)
    assert not strictly_lower(6, 5)


# Properties


def given_back(view: ClusterView, evicted: Sequence[RunningJob]) -> ClusterView:
    """A fresh view of the cluster with the evicted jobs' pods' requests returned to their nodes."""
    free = {n.name: dict(n.free) for n in view.nodes}
    for job in evicted:
        for a in job.assignments:
            for resource, amount in job.requests[a.pod_set].items():
                free[a.node][resource] = free[a.node].get(resource, 0) + amount * a.count
    nodes = [NodeView(n.name, free[n.name], dict(n.allocatable)) for n in view.nodes]
    return ClusterView(view.name, nodes, cordoned=view.cordoned)


def fits(job: JobRequest, view: ClusterView) -> bool:
    return evaluate(job, [view])[0].feasible


@dataclass
class World:
    """Clusters, their running jobs and a candidate, with a queue policy and a quota rule."""

    clusters: list[ClusterView]
    jobs: list[RunningJob]
    candidate: Candidate
    # The candidate's quota fits once this many borrowing jobs are evicted.
    borrowers_needed: int
    now: float
    budget: int

    def may_evict(self, job: RunningJob) -> Reason | None:
        if job.interruptible:
            return Reason.INTERRUPTIBLE
        if job.queue == self.candidate.queue:
            return Reason.PRIORITY if job.priority < self.candidate.job.priority else None
        return Reason.RECLAIM if job.borrowing else None

    def quota_fits_after(self, evicted: Sequence[RunningJob]) -> bool:
        return sum(1 for job in evicted if job.borrowing) >= self.borrowers_needed

    def plan(self, clusters: Sequence[ClusterView] | None = None) -> Plan | None:
        return plan(
            self.candidate,
            self.clusters if clusters is None else clusters,
            self.jobs,
            self.may_evict,
            self.quota_fits_after,
            self.now,
            lambda queue: self.budget,
        )

    def works(self, view: ClusterView, evicted: Sequence[RunningJob]) -> bool:
        return fits(self.candidate.job, given_back(view, evicted)) and self.quota_fits_after(evicted)


# True about one time in six (a biased integer would be 0, the simplest, far more often).
RARELY = st.sampled_from([False] * 5 + [True])


@st.composite
def worlds(draw: st.DrawFn) -> World:
    clusters: list[ClusterView] = []
    jobs: list[RunningJob] = []
    for c in range(draw(st.integers(1, 3))):
        name = f"c{c}"
        allocatable = {
            f"{name}n{i}": {CPU: cpu, MEM: draw(st.integers(2, 8))}
            for i, cpu in enumerate(draw(st.lists(st.integers(2, 8), min_size=1, max_size=3)))
        }
        free = {node: dict(amounts) for node, amounts in allocatable.items()}
        for _ in range(draw(st.integers(1, 6))):
            pod = {CPU: draw(st.integers(1, 3)), MEM: draw(st.integers(0, 2))}
            placed: dict[str, int] = {}
            for _ in range(draw(st.integers(1, 3))):  # first fit, pod by pod
                node = next((n for n, f in free.items() if all(f[r] >= a for r, a in pod.items())), None)
                if node is None:
                    break
                for r, a in pod.items():
                    free[node][r] -= a
                placed[node] = placed.get(node, 0) + 1
            if not placed:
                continue
            jobs.append(
                RunningJob(
                    f"j{len(jobs)}",
                    draw(st.sampled_from(["a", "b"])),
                    name,
                    draw(st.integers(0, 2)),
                    draw(st.integers(0, 20)),
                    tuple(Assignment("w", node, count) for node, count in placed.items()),
                    {"w": pod},
                    started_at=draw(st.sampled_from([0.0, 50.0])),
                    min_run_seconds=draw(st.sampled_from([0.0, 0.0, 100.0])),
                    interruptible=draw(RARELY),
                    borrowing=draw(st.booleans()),
                )
            )
        nodes = [NodeView(n, free[n], allocatable[n]) for n in allocatable]
        clusters.append(ClusterView(name, nodes, cordoned=draw(RARELY)))
    pod_sets = tuple(
        PodSetRequest(f"p{i}", count, draw(st.integers(0, count)), {CPU: draw(st.integers(2, 5)), MEM: 1})
        for i in range(draw(st.integers(1, 2)))
        for count in [draw(st.integers(1, 2))]
    )
    candidate = Candidate(
        JobRequest("cand", pod_sets, draw(st.integers(1, 4))),
        draw(st.sampled_from(["a", "b"])),
        may_preempt=not draw(RARELY),
    )
    return World(
        clusters,
        jobs,
        candidate,
        borrowers_needed=draw(st.sampled_from([0, 0, 0, 1, 1, 2])),
        now=draw(st.sampled_from([0.0, 100.0, 200.0])),
        budget=draw(st.sampled_from([1, 2, 1_000_000])),
    )


def _key(result: Plan, world: World) -> tuple[int, int, str]:
    priority = {job.job_id: job.priority for job in world.jobs}
    return (len(result.evictions), max(priority[e.job_id] for e in result.evictions), result.cluster)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_a_plan_is_one_cluster_of_allowed_victims_that_makes_the_gang_fit_and_no_more(world: World) -> None:
    result = world.plan()
    job = world.candidate.job
    views = {c.name: c for c in world.clusters}
    by_id = {j.job_id: j for j in world.jobs}
    fits_now = world.quota_fits_after(()) and any(fits(job, c) for c in world.clusters)
    if result is None:
        if not world.candidate.may_preempt or fits_now or world.budget < 1_000_000:
            return
        # Complete: no cluster works even with every job it may evict gone.
        for view in world.clusters:
            pool = [
                j
                for j in world.jobs
                if j.cluster == view.name
                and world.now >= j.started_at + j.min_run_seconds
                and world.may_evict(j) is not None
                and not (world.may_evict(j) is Reason.PRIORITY and j.priority >= job.priority)
            ]
            assert not (pool and world.works(view, pool))
        return
    assert world.candidate.may_preempt and not fits_now
    assert 1 <= len(result.evictions) <= world.budget
    # (a) one cluster, each victim once and on it
    assert result.cluster in views
    evicted = [by_id[e.job_id] for e in result.evictions]
    assert len({j.job_id for j in evicted}) == len(evicted)
    assert all(
        e.cluster == result.cluster and by_id[e.job_id].cluster == result.cluster for e in result.evictions
    )
    # (b) only allowed victims, past their minimum run time, never an equal or higher priority for priority
    for eviction, victim in zip(result.evictions, evicted, strict=True):
        assert world.may_evict(victim) is eviction.reason
        assert world.now >= victim.started_at + victim.min_run_seconds
        assert eviction.reason is not Reason.PRIORITY or victim.priority < job.priority
        assert eviction.preemptor == job.id
    # (c) the gang really fits with the victims' resources given back, and so does its quota
    view = views[result.cluster]
    assert world.works(view, evicted)
    # (d) minimal: each victim is needed
    for i in range(len(evicted)):
        assert not world.works(view, evicted[:i] + evicted[i + 1 :])
    # No single cluster offers a better plan: fewer victims, or as few of lower priority.
    for other in world.clusters:
        alone = world.plan([other])
        if alone is not None:
            assert _key(result, world) <= _key(alone, world)
    # The same plan from a prebuilt index.
    assert (
        plan(
            world.candidate,
            world.clusters,
            RunningIndex(world.jobs),
            world.may_evict,
            world.quota_fits_after,
            world.now,
            lambda queue: world.budget,
        )
        == result
    )


def same_queue_any_priority(job: RunningJob) -> Reason | None:
    """A careless policy: it offers every job of the queue. The plan's own guard must hold."""
    return Reason.PRIORITY if job.queue == "team" else None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(1, 2),
    st.lists(st.integers(2, 6), min_size=1, max_size=2),
    st.booleans(),
)
def test_no_ping_pong(
    priority_a: int,
    priority_b: int,
    cpu_a: int,
    cpu_b: int,
    pods_a: int,
    pods_b: int,
    node_cpus: list[int],
    careless: bool,
) -> None:
    nodes = {f"n{i}": cpu for i, cpu in enumerate(node_cpus)}
    job_a, job_b = gang("A", pods_a, cpu_a, priority_a), gang("B", pods_b, cpu_b, priority_b)

    def running_as(job: JobRequest, cpu: int) -> RunningJob | None:
        view = cluster("c1", nodes, [])
        verdict = evaluate(job, [view])[0]
        if not verdict.feasible:
            return None
        placed = {a.node: a.count for a in verdict.assignments}
        return running(job.id, "c1", placed, cpu, job.priority, seq=1 if job.id == "B" else 0)

    def evicts(candidate_job: JobRequest, victim: RunningJob | None) -> bool:
        if victim is None:
            return False
        candidate = Candidate(candidate_job, "team")
        may_evict = same_queue_any_priority if careless else same_queue_lower_priority(candidate)
        result = plan(candidate, [cluster("c1", nodes, [victim])], [victim], may_evict, always, 0.0)
        return result is not None and victim.job_id in victims(result)

    a_evicts_b = evicts(job_a, running_as(job_b, cpu_b))
    b_evicts_a = evicts(job_b, running_as(job_a, cpu_a))
    assert not (a_evicts_b and b_evicts_a)
    if a_evicts_b:
        assert priority_b < priority_a
