"""The queueing cycle: quota before placement, borrowing within a cohort, strict and best-effort
FIFO, held queues, flavors in order, fair ordering between queues."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core.model import ClusterView, JobRequest, NodeView, PodSetRequest
from fedplane.core.pending import PendingQueue
from fedplane.core.placement import Weights
from fedplane.core.queueing import Queues
from fedplane.core.queues import (
    CohortSpec,
    Flavor,
    FlavorQuotas,
    QueueConfig,
    QueueSpec,
    ResourceQuota,
    Strategy,
)
from fedplane.core.quota import QuotaMisfit

GPU = "nvidia.com/gpu"


def job(job_id: str, queue: str, seq: int, gpus: int = 0, cores: int = 1, priority: int = 0) -> JobRequest:
    requests = {"cpu": cores * 1000, **({GPU: gpus} if gpus else {})}
    return JobRequest(job_id, (PodSetRequest("w", 1, 1, requests),), priority, seq, queue=queue)


def cluster(name: str, gpus: int = 64, cores: int = 256, labels: dict[str, str] | None = None) -> ClusterView:
    free = {"cpu": cores * 1000, GPU: gpus}
    return ClusterView(name, [NodeView("n", dict(free), dict(free))], labels=labels or {})


def gpu_queue(name: str, nominal: int, cohort: str = "", **limits: int | None) -> QueueSpec:
    return QueueSpec(name, cohort, quotas=(FlavorQuotas("gpu", {GPU: ResourceQuota(nominal, **limits)}),))


def config(
    *queues: QueueSpec, cohorts: tuple[CohortSpec, ...] = (), flavors: tuple[Flavor, ...] = ()
) -> QueueConfig:
    return QueueConfig(
        {q.name: q for q in queues},
        {c.name: c for c in cohorts},
        {f.name: f for f in (flavors or (Flavor("gpu"),))},
    )


def queues_with(cfg: QueueConfig, *jobs: JobRequest) -> Queues:
    queues = Queues(cfg)
    for j in jobs:
        queues.add(j)
    return queues


def admitted_ids(queues: Queues, clusters: list[ClusterView], limit: int = 100) -> list[str]:
    return [a.job.id for a in queues.cycle(clusters, Weights(), limit)]


def test_a_queue_admits_only_what_its_quota_holds_and_says_what_is_missing() -> None:
    queues = queues_with(config(gpu_queue("a", 8)), *(job(f"j{i}", "a", i, gpus=4) for i in range(3)))
    assert admitted_ids(queues, [cluster("c")]) == ["j0", "j1"]
    misfit = queues.misfit("j2")
    assert isinstance(misfit, QuotaMisfit)
    assert "needs 4, 0 available" in misfit.summary()
    # Nothing changes until quota is given back...
    assert admitted_ids(queues, [cluster("c")]) == []
    # ...and the job that finishes gives it back.
    assert queues.release("j0")
    assert admitted_ids(queues, [cluster("c")]) == ["j2"]


def test_a_queue_borrows_its_idle_neighbours_quota_within_limits() -> None:
    cfg = config(
        gpu_queue("a", 8, "org", borrowing_limit=4),
        gpu_queue("b", 8, "org"),
        cohorts=(CohortSpec("org"),),
    )
    queues = queues_with(cfg, *(job(f"a{i}", "a", i, gpus=4) for i in range(5)))
    # Its own 8 and 4 borrowed from b's idle quota: nominal + borrowing limit, no more.
    assert admitted_ids(queues, [cluster("c")]) == ["a0", "a1", "a2"]
    queues.add(job("b0", "b", 10, gpus=4))
    queues.add(job("b1", "b", 11, gpus=4))
    # b gets the 4 it did not lend, and waits for the 4 a borrowed (no preemption here).
    assert admitted_ids(queues, [cluster("c")]) == ["b0"]
    assert isinstance(queues.misfit("b1"), QuotaMisfit)


def test_lending_limit_keeps_part_of_a_queues_quota_for_itself() -> None:
    cfg = config(
        gpu_queue("a", 8, "org"), gpu_queue("b", 8, "org", lending_limit=4), cohorts=(CohortSpec("org"),)
    )
    queues = queues_with(cfg, *(job(f"a{i}", "a", i, gpus=4) for i in range(4)))
    assert admitted_ids(queues, [cluster("c")]) == ["a0", "a1", "a2"]  # 8 own + 4 lent by b


def test_strict_fifo_waits_for_its_head_and_best_effort_goes_around_it() -> None:
    for strategy, expected in [(Strategy.STRICT_FIFO, []), (Strategy.BEST_EFFORT_FIFO, ["small"])]:
        spec = QueueSpec("q", quotas=(FlavorQuotas("gpu", {GPU: ResourceQuota(4)}),), strategy=strategy)
        queues = queues_with(config(spec), job("big", "q", 1, gpus=8), job("small", "q", 2, gpus=2))
        assert admitted_ids(queues, [cluster("c")]) == expected, strategy


def test_a_held_queue_admits_nothing_until_released() -> None:
    held = QueueSpec("q", held=True)
    queues = queues_with(config(held), job("j", "q", 1))
    assert admitted_ids(queues, [cluster("c")]) == []
    misfit = queues.misfit("j")
    assert misfit is not None and "queue q is held" in misfit.summary()
    queues.configure(config(QueueSpec("q")))
    assert admitted_ids(queues, [cluster("c")]) == ["j"]


def test_flavors_are_tried_in_order_and_restrict_placement_to_their_clusters() -> None:
    flavors = (Flavor("h100", {"gpu": "h100"}), Flavor("a100", {"gpu": "a100"}))
    spec = QueueSpec(
        "q",
        quotas=(
            FlavorQuotas("h100", {GPU: ResourceQuota(8)}),
            FlavorQuotas("a100", {GPU: ResourceQuota(8)}),
        ),
    )
    clusters = [cluster("ca", labels={"gpu": "a100"}), cluster("ch", labels={"gpu": "h100"})]
    queues = queues_with(config(spec, flavors=flavors), *(job(f"j{i}", "q", i, gpus=8) for i in range(3)))
    admitted = queues.cycle(clusters, Weights(), 10)
    assert [(a.job.id, a.flavor, a.decision.cluster) for a in admitted] == [
        ("j0", "h100", "ch"),
        ("j1", "a100", "ca"),
    ]


def test_a_gang_is_charged_whole() -> None:
    gang = JobRequest(
        "g",
        (PodSetRequest("a", 2, 2, {GPU: 2}), PodSetRequest("b", 3, 3, {GPU: 1})),
        seq=1,
        queue="q",
    )
    queues = queues_with(config(gpu_queue("q", 6)), gang)
    assert admitted_ids(queues, [cluster("c")]) == []  # 2*2 + 3*1 = 7 > 6
    queues.configure(config(gpu_queue("q", 7)))
    assert admitted_ids(queues, [cluster("c")]) == ["g"]


def test_a_requeued_job_gives_its_quota_back_and_a_new_config_keeps_what_is_held() -> None:
    queues = queues_with(config(gpu_queue("q", 4)), job("j", "q", 1, gpus=4), job("k", "q", 2, gpus=4))
    assert admitted_ids(queues, [cluster("c")]) == ["j"]
    queues.configure(config(gpu_queue("q", 4)))
    assert admitted_ids(queues, [cluster("c")]) == []  # j's charge survived the rebuild
    queues.add(job("j", "q", 1, gpus=4))  # j requeued: its quota is free again
    assert admitted_ids(queues, [cluster("c")]) == ["j"]  # and it goes first again


def test_jobs_that_fit_no_cluster_keep_placements_reason() -> None:
    queues = queues_with(config(QueueSpec("q")), job("huge", "q", 1, cores=1000))
    assert admitted_ids(queues, [cluster("c")]) == []
    misfit = queues.misfit("huge")
    assert misfit is not None and misfit.summary().startswith("no cluster fits: c: pod set w: insufficient")


def test_queue_view_counts_pending_and_admitted_up_the_tree() -> None:
    cfg = config(gpu_queue("a", 8, "org"), gpu_queue("b", 8, "org"), cohorts=(CohortSpec("org"),))
    queues = queues_with(cfg, *(job(f"a{i}", "a", i, gpus=8) for i in range(3)), job("x", "implicit", 9))
    queues.cycle([cluster("c")], Weights(), 100)
    rows = {row.name: row for row in queues.report()}
    assert (rows["a"].admitted, rows["a"].pending) == (2, 1)
    assert (rows["org"].admitted, rows["org"].pending) == (2, 1)
    assert rows["implicit"].admitted == 1


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3))
def test_equal_queues_with_saturated_demand_get_equal_shares(queue_count: int, gpus: int) -> None:
    names = [f"q{i}" for i in range(queue_count)]
    queues = Queues(config(*(QueueSpec(n) for n in names)))
    for n in names:
        for i in range(40):
            queues.add(job(f"{n}-{i}", n, i, gpus=gpus))
    counts = dict.fromkeys(names, 0)
    # The clusters have room for fewer jobs than are waiting: who gets them is fair share's call.
    for admitted in queues.cycle([cluster("c", gpus=gpus * 10 * queue_count + gpus)], Weights(), 1000):
        counts[admitted.job.queue] += 1
    assert max(counts.values()) - min(counts.values()) <= 1, counts


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 2)), min_size=1, max_size=15))
def test_one_unlimited_queue_admits_exactly_what_the_pending_queue_places(
    drawn: list[tuple[int, int]],
) -> None:
    jobs = [job(f"j{i}", "q", i, cores=cores, priority=p) for i, (cores, p) in enumerate(drawn)]
    queues = queues_with(config(QueueSpec("q")), *jobs)
    pending = PendingQueue()
    for j in jobs:
        pending.add(j)
    clusters = [cluster("c1", cores=12), cluster("c2", cores=8)]
    expected = [(d.job_id, d.cluster) for _, d in pending.cycle(clusters, Weights(), 100)]
    assert [(a.job.id, a.decision.cluster) for a in queues.cycle(clusters, Weights(), 100)] == expected


def test_a_flavors_node_labels_keep_its_pods_on_its_nodes() -> None:
    spot = {"cpu": 8000, GPU: 0}
    mixed = ClusterView(
        "c",
        [
            NodeView("on-demand", dict(spot), dict(spot), labels={"capacity": "on-demand"}),
            NodeView("spot", dict(spot), dict(spot), labels={"capacity": "spot"}),
        ],
    )
    flavors = (Flavor("spot", node_labels={"capacity": "spot"}),)
    spec = QueueSpec("q", quotas=(FlavorQuotas("spot", {"cpu": ResourceQuota(64_000)}),))
    queues = queues_with(config(spec, flavors=flavors), job("a", "q", 1, cores=6), job("b", "q", 2, cores=6))
    admitted = queues.cycle([mixed], Weights(), 10)
    assert [
        (a.job.id, [x.node for x in a.decision.chosen.assignments]) for a in admitted if a.decision.chosen
    ] == [("a", ["spot"])]
    misfit = queues.misfit("b")
    assert (
        misfit is not None
        and "nodes unusable" in misfit.summary()
        and "other node labels" in misfit.summary()
    )
    # Without the flavor's labels nothing holds the same job off the on-demand node.
    open_queues = queues_with(config(QueueSpec("q")), job("b", "q", 2, cores=6))
    assert [a.decision.cluster for a in open_queues.cycle([mixed], Weights(), 10)] == ["c"]


def test_a_job_whose_flavors_clusters_are_full_runs_in_the_next_flavor_its_quota_takes() -> None:
    flavors = (Flavor("eu", {"region": "eu"}), Flavor("us", {"region": "us"}))
    spec = QueueSpec(
        "q",
        quotas=(
            FlavorQuotas("eu", {"cpu": ResourceQuota(64_000)}),
            FlavorQuotas("us", {"cpu": ResourceQuota(64_000)}),
        ),
    )
    clusters = [
        cluster("eu-1", cores=8, labels={"region": "eu"}),
        cluster("us-1", cores=8, labels={"region": "us"}),
    ]
    queues = queues_with(config(spec, flavors=flavors), *(job(f"j{i}", "q", i, cores=8) for i in range(3)))
    admitted = queues.cycle(clusters, Weights(), 10)
    assert [(a.job.id, a.flavor, a.decision.cluster) for a in admitted] == [
        ("j0", "eu", "eu-1"),
        ("j1", "us", "us-1"),
    ]
    misfit = queues.misfit("j2")
    assert misfit is not None and misfit.summary().startswith(
        "no room in flavors eu, us; in us: no cluster fits"
    )


def test_fair_share_preemption_takes_from_the_queue_whose_share_stays_higher() -> None:
    from fedplane.core import preemption
    from fedplane.core.queues import Preemption

    fair = Preemption(fair_share=True)
    cohort = CohortSpec("org", quotas=(FlavorQuotas("gpu", {GPU: ResourceQuota(16)}),))
    cfg = config(
        QueueSpec("a", "org", quotas=(FlavorQuotas("gpu", {GPU: ResourceQuota(0)}),), preemption=fair),
        QueueSpec("b", "org", quotas=(FlavorQuotas("gpu", {GPU: ResourceQuota(0)}),), preemption=fair),
        cohorts=(cohort,),
    )
    queues = queues_with(cfg, *(job(f"b{i}", "b", i, gpus=4) for i in range(4)))
    fleet = [cluster("c", gpus=16)]
    admitted = queues.cycle(fleet, Weights(), 10)
    assert len(admitted) == 4  # b borrowed the whole cohort while a was idle
    running = preemption.RunningIndex(
        preemption.RunningJob(
            a.job.id,
            "b",
            "c",
            0,
            a.job.seq,
            tuple(a.decision.chosen.assignments) if a.decision.chosen else (),
            {"w": {"cpu": 1000, GPU: 4}},
            started_at=0.0,
        )
        for a in admitted
    )
    full = [cluster("c", gpus=0, cores=252)]
    wanting = job("a0", "a", 10, gpus=4)
    queues.add(wanting)
    plan = queues.preempt(wanting, full, running, now=100.0)
    assert plan is not None and [e.reason for e in plan.evictions] == [preemption.Reason.FAIR_SHARE]
    # b's share without one job (12 of 16) stays at least a's with its job (4 of 16).
    assert plan.evictions[0].job_id == "b3"  # the newest
    # Without fair sharing, a queue above its (zero) nominal quota has nothing to reclaim.
    queues.configure(
        config(
            QueueSpec("a", "org", quotas=(FlavorQuotas("gpu", {GPU: ResourceQuota(0)}),)),
            QueueSpec("b", "org", quotas=(FlavorQuotas("gpu", {GPU: ResourceQuota(0)}),)),
            cohorts=(cohort,),
        )
    )
    assert queues.preempt(wanting, full, running, now=100.0) is None
