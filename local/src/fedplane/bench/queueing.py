"""What the federation-wide queueing layer costs, measured on the pure core (no servers).

    python -m fedplane.bench.queueing [--queues 100 --clusters 1000 --jobs 20000 --seed 7] [--json]

- **admission**: a three-level cohort tree (one root organisation, sqrt(queues) departments,
  `queues` team queues), each node with quotas in three flavors (`cpu`, `gpu-a100`,
  `gpu-h100`, which map to cluster labels and a GPU product) of three resources, with
  borrowing and lending limits; a fleet of small clusters; `jobs` pending jobs of mixed
  shapes and priorities spread unevenly over the queues. `Queues.cycle(views, Weights(),
  limit=1000)` runs until a cycle admits fewer than its limit (every head left is then
  blocked by quota or capacity), each admitted job deducted from its cluster between cycles
  as the hub's reservations do. The same jobs then go through one queue without quota
  (`QueueSpec("q")`) and through `PendingQueue.cycle` (placement without a queueing layer):
  the difference is what the layer adds to the dispatch path. Each path starts from a
  freshly built fleet, so none inherits another's placement caches.
- **preemption**: `running` jobs (default 100,000) fill `clusters` clusters completely; a
  `RunningIndex` is built once, then `preemption.plan` is timed for high-priority candidates
  whose queue has lower-priority jobs to evict (same queue, lower priority; quota always
  fits), and for candidates no plan can serve (a whole node, where every node runs a job
  nobody may evict).

Every figure is wall time on this process, garbage collections included (their count and time are
reported). The defaults run in 35-50 s on two cores (a quiet machine) and peak at about 180 MiB
of resident memory (reported as `peak_rss_bytes`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from fedplane.core import preemption
from fedplane.core.model import (
    GPU_PRODUCT_LABEL,
    Assignment,
    ClusterView,
    JobRequest,
    NodeView,
    PodSetRequest,
    Taint,
)
from fedplane.core.pending import PendingQueue
from fedplane.core.placement import Decision, Weights, deducted
from fedplane.core.queueing import Queues, demand
from fedplane.core.queues import (
    CohortSpec,
    Flavor,
    FlavorQuotas,
    QueueConfig,
    QueueSpec,
    ResourceQuota,
)
from fedplane.core.quota import QuotaMisfit
from fedplane.runtime import gcpolicy

GPU = "nvidia.com/gpu"
GIB = 2**30
RESOURCES = ("cpu", "memory", GPU)
# Flavor -> (cluster kind it maps to, GPU product).
FLAVORS = {"cpu": ("cpu", ""), "gpu-a100": ("a100", "A100"), "gpu-h100": ("h100", "H100")}
NODES_PER_CLUSTER = 4
CYCLE_LIMIT = 1000
# Of the free capacity of each flavor, how much the whole tree's nominal quota adds up to, and
# how it is split between the root, the departments and the queues.
QUOTA_SHARE = 0.9
ROOT_PART, DEPARTMENT_PART = 0.1, 0.2
ROOT = "org"
PATHS = ("pending", "one-queue", "tree")
PATH_LABELS = {
    "pending": "PendingQueue.cycle (placement alone, the old path)",
    "one-queue": 'Queues.cycle, one queue without quota (QueueSpec("q"))',
    "tree": "Queues.cycle, the cohort tree with quotas",
}

# Preemption: every node runs PODS_PER_NODE pods of POD_CPU, one of them the platform's.
PREEMPT_NODES = 5
PODS_PER_NODE = 25
POD_CPU = 2560
POD_MEMORY = 10 * GIB
NODE_MEMORY = 256 * GIB
PLATFORM_QUEUE = "platform"
PLATFORM_PRIORITY = 1000
CANDIDATE_PRIORITY = 10
# A cluster's jobs mostly belong to two home queues (teams keep to their clusters).
HOME_SHARE = 0.7


# -------------------------------------------------------------------------------- the workload


def fleet(clusters: int, seed: int) -> list[ClusterView]:
    """`clusters` clusters of NODES_PER_CLUSTER nodes: three in five CPU-only, one in five with
    A100 nodes, one with H100 (8 GPUs each, tainted so CPU work stays off them). Every node
    has 30-100% of its capacity free. The same seed gives the same fleet, built anew."""
    rng = random.Random(seed)
    views = []
    for c in range(clusters):
        kind = ("cpu", "cpu", "cpu", "a100", "h100")[c % 5]
        nodes = []
        for n in range(NODES_PER_CLUSTER):
            if kind == "cpu":
                allocatable = {"cpu": 64_000, "memory": 256 * GIB}
                labels: dict[str, str] = {}
                taints: tuple[Taint, ...] = ()
                share = rng.uniform(0.3, 1.0)
            else:
                allocatable = {"cpu": 96_000, "memory": 1024 * GIB, GPU: 8}
                labels = {GPU_PRODUCT_LABEL: kind.upper()}
                taints = (Taint(GPU, "", "NoSchedule"),)
                share = rng.randint(2, 8) / 8
            free = {r: int(amount * share) for r, amount in allocatable.items()}
            nodes.append(NodeView(f"n{n}", free, allocatable, labels, taints))
        cluster_labels = {"pool": "cpu"} if kind == "cpu" else {"pool": "gpu", "gpu": kind}
        views.append(ClusterView(f"c{c:04d}", nodes, labels=cluster_labels, cost=1 + c % 4))
    return views


def flavors() -> dict[str, Flavor]:
    return {
        name: Flavor(name, {"pool": "cpu"} if kind == "cpu" else {"gpu": kind}, product)
        for name, (kind, product) in FLAVORS.items()
    }


def flavor_capacity(views: Sequence[ClusterView]) -> dict[tuple[str, str], int]:
    """The fleet's free capacity by (flavor, resource): what the quotas are sized from."""
    by_kind: dict[str, dict[str, int]] = {}
    for view in views:
        kind = view.labels.get("gpu", "cpu")
        totals = by_kind.setdefault(kind, {})
        for resource_name, amount in view.total("free").items():
            totals[resource_name] = totals.get(resource_name, 0) + amount
    return {
        (name, r): by_kind.get(kind, {}).get(r, 0) for name, (kind, _) in FLAVORS.items() for r in RESOURCES
    }


def departments_for(queues: int) -> int:
    return max(1, round(math.sqrt(queues)))


def queue_name(index: int) -> str:
    return f"team-{index:03d}"


def cohort_tree(queues: int, capacity: Mapping[tuple[str, str], int], seed: int) -> QueueConfig:
    """One root, sqrt(queues) departments, `queues` queues under them, quotas summing to
    QUOTA_SHARE of `capacity` in every flavor: the root holds ROOT_PART of it, the departments
    DEPARTMENT_PART (evenly), the queues the rest (by a random weight each). A queue may borrow
    as much again as its nominal and lends at most half of it; a department may borrow as
    much as its subtree holds. A CPU flavor's GPU quota is 0, so GPU jobs take a GPU flavor."""
    rng = random.Random(seed)
    departments = departments_for(queues)
    weights = [rng.uniform(0.5, 1.5) for _ in range(queues)]
    dept_of = [q * departments // queues for q in range(queues)]

    def amount(fr: tuple[str, str], part: float) -> int:
        return int(capacity.get(fr, 0) * QUOTA_SHARE * part)

    queue_quota: list[dict[tuple[str, str], int]] = []
    queue_part = 1.0 - ROOT_PART - DEPARTMENT_PART
    for q in range(queues):
        share = queue_part * weights[q] / sum(weights)
        queue_quota.append({(f, r): amount((f, r), share) for f in FLAVORS for r in RESOURCES})
    specs: dict[str, QueueSpec] = {}
    for q in range(queues):
        quotas = tuple(
            FlavorQuotas(
                f,
                {
                    r: ResourceQuota(
                        queue_quota[q][(f, r)], queue_quota[q][(f, r)], queue_quota[q][(f, r)] // 2
                    )
                    for r in RESOURCES
                },
            )
            for f in FLAVORS
        )
        name = queue_name(q)
        specs[name] = QueueSpec(
            name, cohort=f"dept-{dept_of[q]:02d}", weight=round(weights[q], 2), quotas=quotas
        )
    cohorts = {ROOT: CohortSpec(ROOT, "", _cohort_quotas(lambda fr: amount(fr, ROOT_PART), None))}
    for d in range(departments):
        own = {(f, r): amount((f, r), DEPARTMENT_PART / departments) for f in FLAVORS for r in RESOURCES}
        members = [q for q in range(queues) if dept_of[q] == d]
        subtree = {fr: own[fr] + sum(queue_quota[q][fr] for q in members) for fr in own}
        name = f"dept-{d:02d}"
        cohorts[name] = CohortSpec(name, ROOT, _cohort_quotas(own.__getitem__, subtree.__getitem__))
    return QueueConfig(queues=specs, cohorts=cohorts, flavors=flavors())


def _cohort_quotas(
    nominal: Callable[[tuple[str, str]], int], borrowing: Callable[[tuple[str, str]], int] | None
) -> tuple[FlavorQuotas, ...]:
    return tuple(
        FlavorQuotas(
            f,
            {r: ResourceQuota(nominal((f, r)), borrowing((f, r)) if borrowing else None) for r in RESOURCES},
        )
        for f in FLAVORS
    )


def workload(jobs: int, queues: int, seed: int) -> list[JobRequest]:
    """`jobs` gangs: three in four of 1-8 pods of 1, 2 or 4 cpus (4 GiB per cpu), one in four of
    1-4 pods of 1-8 GPUs (8 cpus and 64 GiB per GPU); priority 0-3; spread over the queues by
    a log-normal weight each, so some queues run far past their quota and others idle. Jobs
    name no flavor or GPU product: their queue's flavors decide."""
    rng = random.Random(seed + 1)
    popularity = [rng.lognormvariate(0.0, 0.8) for _ in range(queues)]
    names = [queue_name(q) for q in range(queues)]
    out = []
    for j in range(jobs):
        if rng.random() < 0.75:
            pods = rng.choice((1, 2, 4, 8))
            cpu = rng.choice((1000, 2000, 4000))
            requests = {"cpu": cpu, "memory": cpu // 1000 * 4 * GIB}
        else:
            pods = rng.choice((1, 2, 4))
            gpus = rng.choice((1, 2, 4, 8))
            requests = {"cpu": gpus * 8000, "memory": gpus * 64 * GIB, GPU: gpus}
        queue = rng.choices(names, popularity)[0]
        pod_set = PodSetRequest("w", pods, pods, requests)
        out.append(JobRequest(f"j{j:06d}", (pod_set,), priority=rng.randint(0, 3), seq=j, queue=queue))
    return out


# -------------------------------------------------------------------------------- admission


class AdmittedJob(NamedTuple):
    """What a path admitted, without placement's verdicts: keeping those (hundreds per job
    when a flavor leaves most clusters out) would grow the heap that later paths and cycles
    collect, and bias them."""

    job: JobRequest
    cluster: str
    assignments: tuple[Assignment, ...]
    flavor: str


@dataclass
class PathRun:
    """One path's cycles over the workload: what it admitted, and each cycle's time."""

    path: str
    cycle_seconds: list[float] = field(default_factory=list)
    # The same cycles' thread CPU time: what the code costs without waiting for a CPU on a
    # shared machine.
    cycle_cpu_seconds: list[float] = field(default_factory=list)
    # In admission order.
    admitted: list[AdmittedJob] = field(default_factory=list)
    # Jobs left waiting, by why: "quota" or "capacity".
    waiting: dict[str, int] = field(default_factory=dict)
    full_gcs: int = 0
    full_gc_seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        ms = sorted(s * 1e3 for s in self.cycle_seconds)
        total = sum(self.cycle_seconds)
        cpu = sum(self.cycle_cpu_seconds)
        return {
            "path": self.path,
            "cycles": len(ms),
            "admitted": len(self.admitted),
            "seconds": round(total, 3),
            "admitted_per_s": round(len(self.admitted) / total, 1) if total > 0 else None,
            "us_per_admitted": round(total / len(self.admitted) * 1e6, 1) if self.admitted else None,
            "cpu_seconds": round(cpu, 3),
            "cpu_us_per_admitted": round(cpu / len(self.admitted) * 1e6, 1) if self.admitted else None,
            "cycle_p50_ms": round(_percentile(ms, 0.50), 2) if ms else None,
            "cycle_p99_ms": round(_percentile(ms, 0.99), 2) if ms else None,
            "cycle_max_ms": round(ms[-1], 2) if ms else None,
            "waiting": dict(self.waiting),
            "full_gcs": self.full_gcs,
            "full_gc_ms": round(self.full_gc_seconds * 1e3, 1),
        }


@dataclass
class AdmissionRun:
    queues: int
    clusters: int
    jobs: int
    seed: int
    config: QueueConfig
    paths: dict[str, PathRun]

    def figures(self) -> dict[str, Any]:
        paths = {name: run.figures() for name, run in self.paths.items()}
        tree, pending = paths.get("tree", {}), paths.get("pending", {})
        ratio = cpu_ratio = gc_free_ratio = None
        if tree.get("admitted_per_s") and pending.get("admitted_per_s"):
            ratio = round(tree["admitted_per_s"] / pending["admitted_per_s"], 3)
        if tree.get("cpu_us_per_admitted") and pending.get("cpu_us_per_admitted"):
            cpu_ratio = round(pending["cpu_us_per_admitted"] / tree["cpu_us_per_admitted"], 3)
        if tree.get("admitted") and pending.get("admitted"):

            def gc_free(figures: Mapping[str, Any]) -> float:
                seconds = float(figures["seconds"]) - float(figures["full_gc_ms"]) / 1e3
                return seconds / int(figures["admitted"])

            gc_free_ratio = round(gc_free(pending) / gc_free(tree), 3)
        return {
            "params": {
                "queues": self.queues,
                "clusters": self.clusters,
                "jobs": self.jobs,
                "seed": self.seed,
            },
            "departments": departments_for(self.queues),
            "paths": paths,
            "tree_vs_pending": ratio,
            # The same on CPU time: admitted per CPU second, tree over pending.
            "tree_vs_pending_cpu": cpu_ratio,
            # ... and without the full garbage collections' pauses.
            "tree_vs_pending_without_full_gcs": gc_free_ratio,
        }


def admission(
    queues: int = 100,
    clusters: int = 1000,
    jobs: int = 20_000,
    seed: int = 7,
    paths: Sequence[str] = PATHS,
    limit: int = CYCLE_LIMIT,
) -> AdmissionRun:
    """Drain the workload through each of `paths` (see the module's docstring)."""
    config = cohort_tree(queues, flavor_capacity(fleet(clusters, seed)), seed)
    requests = workload(jobs, queues, seed)
    runs = {path: _drain(path, config, requests, fleet(clusters, seed), limit) for path in paths}
    return AdmissionRun(queues, clusters, jobs, seed, config, runs)


def _drain(
    path: str, config: QueueConfig, requests: Sequence[JobRequest], views: list[ClusterView], limit: int
) -> PathRun:
    """Cycles until one admits fewer than `limit`: its every head was then blocked, and
    capacity only shrinks and quota only fills between cycles here, so nothing more would go."""
    run = PathRun(path)
    position = {view.name: i for i, view in enumerate(views)}
    weights = Weights()
    cycle: Callable[[], list[tuple[JobRequest, Decision, str]]]
    if path == "pending":
        pending = PendingQueue()
        for job in requests:
            pending.add(job)

        def cycle() -> list[tuple[JobRequest, Decision, str]]:
            return [(job, decision, "") for job, decision in pending.cycle(views, weights, limit)]

    else:
        if path == "tree":
            queued = Queues(config)
            jobs: Sequence[JobRequest] = requests
        else:
            queued = Queues(QueueConfig(queues={"q": QueueSpec("q")}))
            jobs = [replace(job, queue="q") for job in requests]
        for job in jobs:
            queued.add(job)

        def cycle() -> list[tuple[JobRequest, Decision, str]]:
            return [(a.job, a.decision, a.flavor) for a in queued.cycle(views, weights, limit)]

    gc.collect()
    with _FullGcs() as collections:
        while True:
            began, began_cpu = time.perf_counter(), time.thread_time()
            admitted = cycle()
            run.cycle_seconds.append(time.perf_counter() - began)
            run.cycle_cpu_seconds.append(time.thread_time() - began_cpu)
            # The hub reserves what it dispatched on its cluster's view before the next cycle.
            for job, decision, flavor in admitted:
                chosen = decision.chosen
                assert chosen is not None and decision.cluster is not None
                i = position[decision.cluster]
                views[i] = deducted(views[i], job, chosen.assignments)
                run.admitted.append(AdmittedJob(job, decision.cluster, tuple(chosen.assignments), flavor))
            if len(admitted) < limit:
                break
    run.full_gcs, run.full_gc_seconds = collections.count, collections.seconds
    if path == "pending":
        run.waiting = {"capacity": len(pending)} if len(pending) else {}
    else:
        for job_id in list(queued):
            misfit = queued.misfit(job_id)
            why = "quota" if isinstance(misfit, QuotaMisfit) else "capacity"
            run.waiting[why] = run.waiting.get(why, 0) + 1
    return run


def iter_admitted(run: PathRun) -> Iterator[tuple[str, str, dict[str, int]]]:
    """(queue, flavor, demand) of every admitted job: to recompute quota usage from."""
    for admitted in run.admitted:
        yield admitted.job.queue, admitted.flavor, demand(admitted.job)


# -------------------------------------------------------------------------------- preemption


@dataclass
class PreemptionRun:
    clusters: int
    running: list[preemption.RunningJob]
    views: list[ClusterView]
    index_seconds: float
    first_plan_seconds: float
    # A later round's index (built from this one) and its first plan.
    next_round_seconds: float
    # (candidate, its plan or None, whether a plan must exist, seconds)
    plans: list[tuple[preemption.Candidate, preemption.Plan | None, bool, float]]
    # The same for candidates that no plan can serve.
    impossible: list[tuple[preemption.Candidate, preemption.Plan | None, bool, float]]
    full_gcs: int

    def figures(self) -> dict[str, Any]:
        def summary(rows: Sequence[tuple[Any, preemption.Plan | None, bool, float]]) -> dict[str, Any]:
            ms = sorted(seconds * 1e3 for *_, seconds in rows)
            found = [plan for _, plan, _, _ in rows if plan is not None]
            return {
                "candidates": len(rows),
                "plans_found": len(found),
                "plans_that_must_exist": sum(1 for _, _, must, _ in rows if must),
                "victims_median": statistics.median(len(p.evictions) for p in found) if found else None,
                "p50_ms": round(_percentile(ms, 0.50), 2) if ms else None,
                "p99_ms": round(_percentile(ms, 0.99), 2) if ms else None,
                "max_ms": round(ms[-1], 2) if ms else None,
            }

        return {
            "params": {"running": len(self.running), "clusters": self.clusters},
            "index_ms": round(self.index_seconds * 1e3, 1),
            "first_plan_ms": round(self.first_plan_seconds * 1e3, 1),
            "next_round_first_plan_ms": round(self.next_round_seconds * 1e3, 1),
            "plan": summary(self.plans),
            "no_plan": summary(self.impossible),
            "full_gcs": self.full_gcs,
        }


def full_fleet(
    clusters: int, running: int, seed: int
) -> tuple[list[ClusterView], list[preemption.RunningJob]]:
    """Clusters of PREEMPT_NODES nodes with no cpu free, and the jobs that fill them.

    Each node runs PODS_PER_NODE pods of POD_CPU: one of a platform job (priority
    PLATFORM_PRIORITY, queue `platform`, which no candidate may evict), the rest of team jobs
    of one pod or two (on any nodes of the cluster), priority 0-5, mostly (HOME_SHARE) of
    the cluster's two home queues. `running` jobs are spread as evenly as the pod slots allow.
    """
    rng = random.Random(seed + 2)
    queues = 100
    views: list[ClusterView] = []
    jobs: list[preemption.RunningJob] = []
    requests = {"w": {"cpu": POD_CPU, "memory": POD_MEMORY}}
    seq = 0
    per_cluster = running // clusters
    for c in range(clusters):
        name = f"p{c:04d}"
        nodes = [
            NodeView(
                f"n{n}",
                {"cpu": 0, "memory": NODE_MEMORY - PODS_PER_NODE * POD_MEMORY},
                {"cpu": PODS_PER_NODE * POD_CPU, "memory": NODE_MEMORY},
            )
            for n in range(PREEMPT_NODES)
        ]
        views.append(ClusterView(name, nodes))
        home = (queue_name(c % queues), queue_name((c * 7 + 3) % queues))
        team_slots = [f"n{n}" for n in range(PREEMPT_NODES) for _ in range(PODS_PER_NODE - 1)]
        rng.shuffle(team_slots)
        wanted = per_cluster + (1 if c < running % clusters else 0) - PREEMPT_NODES
        team_jobs = min(max(1, wanted), len(team_slots))
        # Team jobs of one pod and of two, so that they use every team slot.
        doubles = max(0, min(len(team_slots) - team_jobs, team_jobs))
        for n in range(PREEMPT_NODES):
            assignment = (Assignment("w", f"n{n}", 1),)
            jobs.append(
                preemption.RunningJob(
                    f"{name}-platform-{n}",
                    PLATFORM_QUEUE,
                    name,
                    PLATFORM_PRIORITY,
                    seq,
                    assignment,
                    requests,
                    0.0,
                )
            )
            seq += 1
        slots = iter(team_slots)
        for j in range(team_jobs):
            pods = 2 if j < doubles else 1
            placed: dict[str, int] = {}
            for _ in range(pods):
                node = next(slots, None)
                if node is not None:
                    placed[node] = placed.get(node, 0) + 1
            queue = rng.choice(home) if rng.random() < HOME_SHARE else queue_name(rng.randrange(queues))
            jobs.append(
                preemption.RunningJob(
                    f"{name}-t{j}",
                    queue,
                    name,
                    rng.randint(0, 5),
                    seq,
                    tuple(Assignment("w", node, count) for node, count in placed.items()),
                    requests,
                    0.0,
                )
            )
            seq += 1
    return views, jobs


def _candidates(clusters: int, count: int, seed: int, whole_node: bool) -> list[preemption.Candidate]:
    """High-priority gangs of a home queue of some cluster; `whole_node`: one pod of a whole node."""
    rng = random.Random(seed + 3 + whole_node)
    shapes = ((1, 2 * POD_CPU), (2, 2 * POD_CPU), (4, POD_CPU), (1, 4 * POD_CPU))
    out = []
    for k in range(count):
        c = rng.randrange(clusters)
        queue = queue_name(c % 100) if k % 2 else queue_name((c * 7 + 3) % 100)
        pods, cpu = (1, PODS_PER_NODE * POD_CPU) if whole_node else rng.choice(shapes)
        memory = cpu // POD_CPU * POD_MEMORY
        job = JobRequest(
            f"cand-{'node' if whole_node else 'gang'}-{k}",
            (PodSetRequest("w", pods, pods, {"cpu": cpu, "memory": memory}),),
            priority=CANDIDATE_PRIORITY,
            seq=10**9 + k,
            queue=queue,
        )
        out.append(preemption.Candidate(job, queue))
    return out


def may_evict_for(
    candidate: preemption.Candidate,
) -> Callable[[preemption.RunningJob], preemption.Reason | None]:
    """Within the queue, lower priority: the default policy (WithinQueue.LOWER_PRIORITY)."""
    queue, priority = candidate.queue, candidate.job.priority

    def may_evict(job: preemption.RunningJob) -> preemption.Reason | None:
        return preemption.Reason.PRIORITY if job.queue == queue and job.priority < priority else None

    return may_evict


def _always(victims: Sequence[preemption.RunningJob]) -> bool:
    return True


def by_cluster_and_queue(
    running: Sequence[preemption.RunningJob],
) -> dict[tuple[str, str], list[preemption.RunningJob]]:
    out: dict[tuple[str, str], list[preemption.RunningJob]] = {}
    for job in running:
        out.setdefault((job.cluster, job.queue), []).append(job)
    return out


def plan_must_exist(
    candidate: preemption.Candidate,
    views: Sequence[ClusterView],
    jobs_of: Mapping[tuple[str, str], Sequence[preemption.RunningJob]],
) -> bool:
    """Whether some cluster, with every job the policy lets go evicted, takes the gang: then
    the planner, which tries that whole pool first, must find a plan (a sufficient test,
    independent of the planner's search). The policy (`may_evict_for`) lets only the
    candidate's own queue go, so only its jobs (`jobs_of`: by cluster and queue) are looked
    at. Pods of the gang's one pod set are counted node by node."""
    may_evict = may_evict_for(candidate)
    (pod_set,) = candidate.job.pod_sets
    for view in views:
        evictable = [job for job in jobs_of.get((view.name, candidate.queue), ()) if may_evict(job)]
        if not evictable:
            continue
        free = {node.name: dict(node.free) for node in view.nodes}
        for job in evictable:
            for assignment in job.assignments:
                node_free = free[assignment.node]
                for resource_name, amount in job.requests[assignment.pod_set].items():
                    node_free[resource_name] = node_free.get(resource_name, 0) + amount * assignment.count
        fitting = sum(
            min(node_free.get(r, 0) // amount for r, amount in pod_set.requests.items() if amount > 0)
            for node_free in free.values()
        )
        if fitting >= pod_set.count:
            return True
    return False


def preemption_run(
    running: int = 100_000, clusters: int = 1000, candidates: int = 20, seed: int = 7
) -> PreemptionRun:
    views, jobs = full_fleet(clusters, running, seed)
    gc.collect()
    with _FullGcs() as collections:
        began = time.perf_counter()
        index = preemption.RunningIndex(jobs)
        index_seconds = time.perf_counter() - began
        gangs = _candidates(clusters, candidates + 1, seed, whole_node=False)
        whole = _candidates(clusters, max(3, candidates // 4), seed, whole_node=True)
        first_plan_seconds = _timed_plan(gangs[0], views, index)[1]
        timed = [(c, *_timed_plan(c, views, index)) for c in gangs[1:]]
        timed_whole = [(c, *_timed_plan(c, views, index)) for c in whole]
        # The next round, as the hub runs it: the same running jobs, indexed again from this
        # index (what each unchanged job gives back is carried over), then its first plan.
        began = time.perf_counter()
        next_index = preemption.RunningIndex(jobs, index)
        next_round_seconds = time.perf_counter() - began + _timed_plan(gangs[0], views, next_index)[1]
    jobs_of = by_cluster_and_queue(jobs)
    plans = [(c, plan, plan_must_exist(c, views, jobs_of), s) for c, plan, s in timed]
    impossible = [(c, plan, plan_must_exist(c, views, jobs_of), s) for c, plan, s in timed_whole]
    return PreemptionRun(
        clusters,
        jobs,
        views,
        index_seconds,
        first_plan_seconds,
        next_round_seconds,
        plans,
        impossible,
        collections.count,
    )


def _timed_plan(
    candidate: preemption.Candidate, views: Sequence[ClusterView], index: preemption.RunningIndex
) -> tuple[preemption.Plan | None, float]:
    may_evict = may_evict_for(candidate)
    began = time.perf_counter()
    found = preemption.plan(candidate, views, index, may_evict, _always, now=1e6)
    return found, time.perf_counter() - began


# -------------------------------------------------------------------------------- reporting


class _FullGcs:
    """Counts full (generation 2) collections, and their time, while it is entered: they land
    in the timings."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: Mapping[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._began

    def __enter__(self) -> _FullGcs:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank."""
    rank = math.ceil(q * len(ordered) - 1e-9)
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(
    queues: int = 100,
    clusters: int = 1000,
    jobs: int = 20_000,
    running: int = 100_000,
    candidates: int = 20,
    seed: int = 7,
) -> dict[str, Any]:
    """Both benchmarks' figures, as JSON-ready values."""
    began = time.perf_counter()
    admitted = admission(queues, clusters, jobs, seed).figures()
    planned = preemption_run(running, clusters, candidates, seed).figures()
    return {
        "admission": admitted,
        "preemption": planned,
        "peak_rss_bytes": peak_rss_bytes(),
        "wall_seconds": round(time.perf_counter() - began, 1),
    }


def _number(value: Any, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def format_table(result: Mapping[str, Any]) -> Table:
    admitted, planned = result["admission"], result["preemption"]
    p = admitted["params"]
    table = Table(
        title=(
            f"Queueing: {p['queues']} queues under {admitted['departments']} departments and 1 root, "
            f"{p['clusters']:,} clusters x {NODES_PER_CLUSTER} nodes, {p['jobs']:,} jobs, seed {p['seed']}"
        ),
        header_style="bold",
        title_justify="left",
    )
    table.add_column("FIGURE")
    table.add_column("VALUE", justify="right")
    table.add_column("HOW", style="dim")
    for name in PATHS:
        figures = admitted["paths"].get(name)
        if figures is None:
            continue
        waiting = ", ".join(f"{n:,} for {why}" for why, n in sorted(figures["waiting"].items())) or "none"
        table.add_row(
            f"{name}: admitted/s",
            _number(figures["admitted_per_s"], suffix=" jobs/s"),
            f"{PATH_LABELS[name]}: {figures['admitted']:,} admitted in {figures['cycles']} cycles "
            f"({figures['seconds']:.2f}s); left waiting: {waiting}",
        )
        table.add_row(
            f"{name}: cycle p50 / p99",
            f"{_number(figures['cycle_p50_ms'], 1)} / {_number(figures['cycle_p99_ms'], 1)} ms",
            f"{_number(figures['us_per_admitted'], 1)} µs per admitted job "
            f"({_number(figures['cpu_us_per_admitted'], 1)} µs of CPU); {figures['full_gcs']} full GCs "
            f"({_number(figures['full_gc_ms'])} ms)",
        )
    table.add_row(
        "tree / pending admitted/s",
        f"{_number(admitted['tree_vs_pending'], 3)} ({_number(admitted['tree_vs_pending_cpu'], 3)} on CPU)",
        "what the queueing layer leaves of placement's throughput; "
        f"{_number(admitted['tree_vs_pending_without_full_gcs'], 3)} without full GCs' pauses",
    )
    q = planned["params"]
    table.add_row(
        "RunningIndex built",
        f"{planned['index_ms']:,.1f} ms",
        f"{q['running']:,} running jobs over {q['clusters']:,} full clusters",
    )
    table.add_row(
        "first plan",
        f"{planned['first_plan_ms']:,.1f} ms",
        "works out the holdings of every cluster it looks at",
    )
    table.add_row(
        "next round: index + first plan",
        f"{planned['next_round_first_plan_ms']:,.1f} ms",
        "a new index from the last one (unchanged jobs' holdings carried over), as each hub round builds",
    )
    for key, label, how in (
        ("plan", "plan p50 / p99", "gangs of a queue with lower-priority jobs to evict"),
        ("no_plan", "no plan p50 / p99", "a whole node, where every node runs a job nobody may evict"),
    ):
        figures = planned[key]
        table.add_row(
            label,
            f"{_number(figures['p50_ms'], 1)} / {_number(figures['p99_ms'], 1)} ms",
            f"{how}: {figures['plans_found']} of {figures['candidates']} planned "
            f"({figures['plans_that_must_exist']} must be), "
            f"median victims {_number(figures['victims_median'])}",
        )
    table.add_row(
        "peak memory",
        f"{result['peak_rss_bytes'] / 2**20:,.0f} MiB",
        f"the process's peak resident set; {result['wall_seconds']:.0f}s in all",
    )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fedplane.bench.queueing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--queues", type=int, default=100)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=20_000, help="pending jobs for admission")
    parser.add_argument("--running", type=int, default=100_000, help="running jobs for preemption")
    parser.add_argument("--candidates", type=int, default=20, help="preemption candidates timed")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    for name in ("queues", "clusters", "jobs", "running", "candidates"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be at least 1")
    if args.running < args.clusters * PREEMPT_NODES:
        parser.error(f"--running: at least {PREEMPT_NODES} per cluster (the platform's jobs)")
    # As the hub runs its cycles: with the daemons' garbage-collector settings.
    gcpolicy.for_daemon()
    result = run(args.queues, args.clusters, args.jobs, args.running, args.candidates, args.seed)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        Console(width=max(160, Console().width)).print(format_table(result))


if __name__ == "__main__":
    main()
