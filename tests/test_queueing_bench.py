"""The queueing benchmark at a tiny size: its figures must count real admissions and plans.

A benchmark that silently admits nothing, counts a job twice, lets a queue past its quota or
never finds a preemption plan would still print fast figures; these checks recompute what
each figure rests on from the benchmark's own output.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from rich.console import Console

from fedplane.bench import queueing
from fedplane.core.queues import FlavorQuotas, QueueConfig

QUEUES, CLUSTERS, JOBS, RUNNING = 4, 20, 500, 2000
SEED = 3
FR = tuple[str, str]


@pytest.fixture(scope="module")
def admission() -> queueing.AdmissionRun:
    # A limit well under the jobs: several cycles, with deductions between them.
    return queueing.admission(queues=QUEUES, clusters=CLUSTERS, jobs=JOBS, seed=SEED, limit=60)


@pytest.fixture(scope="module")
def planned() -> queueing.PreemptionRun:
    return queueing.preemption_run(running=RUNNING, clusters=CLUSTERS, candidates=12, seed=SEED)


def test_every_path_admits_each_job_once_and_accounts_for_the_rest(admission: queueing.AdmissionRun) -> None:
    assert set(admission.paths) == set(queueing.PATHS)
    for name, run in admission.paths.items():
        ids = [admitted.job.id for admitted in run.admitted]
        assert len(ids) == len(set(ids)), name
        assert 0 < len(ids) <= JOBS, name
        # Every job is either admitted or still waiting, for a reason.
        assert len(ids) + sum(run.waiting.values()) == JOBS, name
        figures = run.figures()
        assert figures["admitted"] == len(ids) and figures["cycles"] == len(run.cycle_seconds) >= 1
        assert figures["admitted_per_s"] > 0 and figures["cpu_us_per_admitted"] > 0


def test_admitted_jobs_fit_the_nodes_they_were_placed_on(admission: queueing.AdmissionRun) -> None:
    free = {(v.name, n.name): dict(n.free) for v in queueing.fleet(CLUSTERS, SEED) for n in v.nodes}
    for name, run in admission.paths.items():
        used: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for admitted in run.admitted:
            requests = {p.name: p.requests for p in admitted.job.pod_sets}
            for assignment in admitted.assignments:
                for resource, amount in requests[assignment.pod_set].items():
                    used[admitted.cluster, assignment.node][resource] += amount * assignment.count
        for node, amounts in used.items():
            for resource, amount in amounts.items():
                assert amount <= free[node].get(resource, 0), (name, node, resource)


def test_the_tree_keeps_every_queue_and_cohort_within_its_quota(admission: queueing.AdmissionRun) -> None:
    tree = admission.paths["tree"]
    config = admission.config
    usage: dict[str, dict[FR, int]] = defaultdict(lambda: defaultdict(int))
    flavors = config.flavors
    clusters = {v.name: v for v in queueing.fleet(CLUSTERS, SEED)}
    for (queue, flavor, wanted), placed in zip(queueing.iter_admitted(tree), tree.admitted, strict=True):
        assert flavor in flavors, "the tree's every job is admitted in one of its queue's flavors"
        # ... and runs where that flavor is offered.
        labels = clusters[placed.cluster].labels
        assert all(labels.get(k) == v for k, v in flavors[flavor].cluster_labels.items())
        for resource, amount in wanted.items():
            usage[queue][flavor, resource] += amount
    nominal = _nominals(config)
    for queue, spec in config.queues.items():
        for flavor_quotas in spec.quotas:
            for resource, quota in flavor_quotas.resources.items():
                limit = quota.nominal + (quota.borrowing_limit or 0)
                assert usage[queue][flavor_quotas.flavor, resource] <= limit, (queue, flavor_quotas.flavor)
    for cohort, cohort_spec in config.cohorts.items():
        members = [q for q, s in config.queues.items() if s.cohort == cohort or cohort == queueing.ROOT]
        for flavor_quotas in cohort_spec.quotas:
            for resource, quota in flavor_quotas.resources.items():
                fr = (flavor_quotas.flavor, resource)
                held = sum(usage[q][fr] for q in members)
                # A subtree holds at most every nominal in it plus what it may borrow.
                assert held <= nominal[cohort][fr] + (quota.borrowing_limit or 0), (cohort, fr)
    # Quota really binds here, and jobs wait for it: the bench measures the quota path.
    assert tree.waiting.get("quota", 0) > 0
    assert len(tree.admitted) < len(admission.paths["one-queue"].admitted)


def _nominals(config: QueueConfig) -> dict[str, dict[FR, int]]:
    """Each cohort's subtree's nominal quotas summed, by flavor and resource."""
    out: dict[str, dict[FR, int]] = defaultdict(lambda: defaultdict(int))

    def add(cohort: str, quotas: tuple[FlavorQuotas, ...]) -> None:
        while cohort:
            for flavor_quotas in quotas:
                for resource, quota in flavor_quotas.resources.items():
                    out[cohort][flavor_quotas.flavor, resource] += quota.nominal
            cohort = config.cohorts[cohort].parent

    for spec in config.queues.values():
        add(spec.cohort, spec.quotas)
    for name, cohort_spec in config.cohorts.items():
        add(name, cohort_spec.quotas)
    return out


def test_preemption_plans_exist_where_they_must_and_evict_only_what_the_policy_allows(
    planned: queueing.PreemptionRun,
) -> None:
    assert len(planned.running) == RUNNING
    jobs = {job.job_id: job for job in planned.running}
    views = {view.name: view for view in planned.views}
    must = [row for row in planned.plans if row[2]]
    assert must, "some candidate must be plannable, or the timings measure no plan"
    for candidate, plan, must_exist, _ in planned.plans:
        if must_exist:
            assert plan is not None, candidate.job.id
        if plan is None:
            continue
        (pod_set,) = candidate.job.pod_sets
        free = {n.name: dict(n.free) for n in views[plan.cluster].nodes}
        for eviction in plan.evictions:
            victim = jobs[eviction.job_id]
            assert victim.cluster == eviction.cluster == plan.cluster
            assert victim.queue == candidate.queue and victim.priority < candidate.job.priority
            for assignment in victim.assignments:
                for resource, amount in victim.requests[assignment.pod_set].items():
                    free[assignment.node][resource] += amount * assignment.count
        fitting = sum(
            min(node.get(r, 0) // amount for r, amount in pod_set.requests.items()) for node in free.values()
        )
        assert fitting >= pod_set.count, "the victims free room for the whole gang"
    for candidate, plan, must_exist, _ in planned.impossible:
        assert plan is None and not must_exist, candidate.job.id
    figures = planned.figures()
    assert figures["plan"]["plans_found"] >= figures["plan"]["plans_that_must_exist"] == len(must)


def test_the_command_prints_every_figure_as_json_and_as_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--queues", "3", "--clusters", "10", "--jobs", "200", "--running", "500", "--candidates", "3"]
    queueing.main([*argv, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["admission"]["paths"]) == set(queueing.PATHS)
    assert result["preemption"]["params"] == {"running": 500, "clusters": 10}
    assert result["peak_rss_bytes"] > 0
    console = Console(width=240, record=True)
    console.print(queueing.format_table(result))
    text = console.export_text()
    labels = ("tree: admitted/s", "pending: cycle p50 / p99", "plan p50 / p99", "RunningIndex built")
    for label in (*labels, "next round: index + first plan"):
        assert label in text
