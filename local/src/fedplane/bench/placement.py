"""`fedplane bench placement`: the hub's placement path on a large synthetic federation, in process.

No servers: clusters are fed to a `ClusterRegistry` as protobuf inventories, exactly as the
hub receives them, and each placement is timed the way the hub makes it: the registry's
views, then `place_batch`. Two figures:

- single-job latency: one job per placement cycle; each placed job is reserved on its
  cluster (as the hub does after dispatching it), and between cycles a few clusters report
  a new inventory (the cluster that got the last job, accounting for it, plus round-robin
  periodic reports), so the registry's cached views keep being rebuilt and updated;
- batch throughput: `batch` jobs placed by one `place_batch` call.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from fedplane.core.health import HealthThresholds
from fedplane.core.model import ClusterView, JobRequest, NodeView, PodSetRequest
from fedplane.core.placement import place_batch
from fedplane.hub.clusters import ClusterRegistry, ClusterState
from fedplane.v1 import agent_pb2 as agent_pb
from fedplane.v1 import types_pb2 as pb

GPU = "nvidia.com/gpu"


def synthetic(
    clusters: int, nodes: int, jobs: int, seed: int = 7
) -> tuple[list[ClusterView], list[JobRequest]]:
    """A federation of `clusters` x `nodes` (every third cluster with 8 A100s per node), and jobs.

    Node free capacity is 20-100% of allocatable; a quarter of the jobs are 4-pod A100 gangs,
    the rest 1-8 pods of 0.5, 2 or 8 cores. Jobs have no placement constraints.
    """
    rng = random.Random(seed)
    views = []
    for c in range(clusters):
        gpu = c % 3 == 0
        node_list = []
        for n in range(nodes):
            alloc = {"cpu": 96_000, "memory": 768 * 2**30, **({GPU: 8} if gpu else {})}
            free = {k: int(v * rng.uniform(0.2, 1.0)) for k, v in alloc.items()}
            labels = {"nvidia.com/gpu.product": "A100"} if gpu else {}
            node_list.append(NodeView(f"n{n}", free, alloc, labels))
        views.append(ClusterView(f"c{c}", node_list, labels={"region": f"r{c % 5}"}, cost=1 + c % 4))
    requests = []
    for j in range(jobs):
        if j % 4 == 0:
            pod = PodSetRequest("w", 4, 4, {"cpu": 8000, "memory": 64 * 2**30, GPU: 2}, "A100")
        else:
            pod = PodSetRequest(
                "w", rng.randint(1, 8), 0, {"cpu": rng.choice([500, 2000, 8000]), "memory": 2**32}
            )
        requests.append(JobRequest(f"j{j}", (pod,), priority=rng.randint(0, 3), seq=j))
    return views, requests


def inventory(view: ClusterView, accounted: Sequence[str] = ()) -> agent_pb.Inventory:
    """The inventory message an agent would send for the view (its nodes' free capacity as is)."""
    message = agent_pb.Inventory(
        cluster=view.name, labels=dict(view.labels), cost=view.cost, accounted_jobs=list(accounted)
    )
    for node in view.nodes:
        out = message.nodes.add(name=node.name, ready=node.schedulable, labels=dict(node.labels))
        out.taints.extend(pb.Taint(key=t.key, value=t.value, effect=t.effect) for t in node.taints)
        out.allocatable.quantities.update(node.allocatable)
        out.free.quantities.update(node.free)
    return message


def registry_of(views: Sequence[ClusterView], now: float) -> ClusterRegistry:
    """A registry holding the views' clusters as reported inventories, all healthy."""
    registry = ClusterRegistry(HealthThresholds.uniform(1e9))
    for view in views:
        state, _ = registry.get_or_add(view.name)
        state.heartbeat = agent_pb.Heartbeat(cluster=view.name, agent_id="bench", version="bench")
        state.last_seen = now
        state.apply_inventory(inventory(view))
    return registry


def _report(state: ClusterState, now: float, thresholds: HealthThresholds) -> None:
    """The cluster's agent reports: what the hub believes it holds, its reservations accounted for."""
    state.apply_inventory(inventory(state.view(now, thresholds), list(state.reservations)))


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = math.ceil(q * len(ordered) - 1e-9)  # the epsilon: 0.99 * 300 is 297.00000000000006
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def run(
    clusters: int,
    nodes: int,
    jobs: int,
    batch: int,
    seed: int = 7,
    reports: int = 2,
    repeat: int = 3,
) -> dict[str, Any]:
    """Measure single-job placement latency over `jobs` cycles, and throughput of `batch`-job calls.

    `reports` inventories are applied between single-job cycles (see the module docstring);
    the batch figures are the best and median of `repeat` calls on the same state.
    """
    views, requests = synthetic(clusters, nodes, max(jobs, batch), seed)
    start = time.time()
    registry = registry_of(views, start)
    del views

    began = time.perf_counter()
    registry.views(start)
    cold_ms = (time.perf_counter() - began) * 1e3
    # Setup garbage is not what a running hub collects: start the timed part from a clean heap.
    gc.collect()
    pauses = _GcPauses()
    gc.callbacks.append(pauses)
    try:
        single = _single(registry, requests[:jobs], reports)
        full_collections, full_ms = pauses.full, pauses.full_ms
        batched = _batch(registry, requests[:batch], repeat)
    finally:
        gc.callbacks.remove(pauses)
    return {
        "params": {
            "clusters": clusters,
            "nodes": nodes,
            "jobs": jobs,
            "batch": batch,
            "seed": seed,
            "reports": reports,
            "repeat": repeat,
        },
        "cold_views_ms": cold_ms,
        "single": {**single, "full_gc": full_collections, "full_gc_ms": full_ms},
        "batch": batched,
    }


class _GcPauses:
    """Counts full (generation 2) garbage collections and their time: the usual source of outliers."""

    def __init__(self) -> None:
        self.full = 0
        self.full_ms = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: Mapping[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.full += 1
            self.full_ms += (time.perf_counter() - self._began) * 1e3


def _single(registry: ClusterRegistry, requests: Sequence[JobRequest], reports: int) -> dict[str, Any]:
    """One job per cycle: views, place_batch, reserve; then `reports` inventories arrive."""
    thresholds = registry.thresholds
    names = sorted(registry.clusters)

    latencies: list[float] = []
    cpu: list[float] = []
    placed = applied = periodic = 0
    last: str | None = None
    for job in requests:
        now = time.time()
        began, began_cpu = time.perf_counter(), time.thread_time()
        (decision,) = place_batch([job], registry.views(now))
        chosen = decision.chosen
        if decision.cluster is not None and chosen is not None:
            registry.clusters[decision.cluster].reserve(job, 1, chosen.assignments)
        latencies.append((time.perf_counter() - began) * 1e3)
        cpu.append((time.thread_time() - began_cpu) * 1e3)
        placed += decision.cluster is not None
        # Reports arriving before the next cycle: the last job's cluster accounts for it, and
        # others report periodically.
        reporting = [last] if last is not None and reports > 0 else []
        while len(reporting) < reports and names:
            reporting.append(names[periodic % len(names)])
            periodic += 1
        for name in reporting:
            _report(registry.clusters[name], now, thresholds)
        applied += len(reporting)
        last = decision.cluster
    latencies.sort()
    cpu.sort()
    return {
        "jobs": len(latencies),
        "placed": placed,
        "inventories_applied": applied,
        "p50_ms": _percentile(latencies, 0.50),
        "p90_ms": _percentile(latencies, 0.90),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": latencies[-1],
        "mean_ms": statistics.fmean(latencies),
        # CPU time of the same cycles: on a shared machine, what the code costs without the waits.
        "cpu_p50_ms": _percentile(cpu, 0.50),
        "cpu_p99_ms": _percentile(cpu, 0.99),
    }


def _batch(registry: ClusterRegistry, requests: Sequence[JobRequest], repeat: int) -> dict[str, Any]:
    """`repeat` calls placing all of `requests` at once, on the same state (nothing is reserved)."""
    seconds: list[float] = []
    placed = 0
    for _ in range(repeat):
        now = time.time()
        began = time.perf_counter()
        decisions = place_batch(requests, registry.views(now))
        seconds.append(time.perf_counter() - began)
        placed = sum(1 for d in decisions if d.cluster is not None)
    best = min(seconds)
    return {
        "jobs": len(requests),
        "placed": placed,
        "best_s": best,
        "median_s": statistics.median(seconds),
        "jobs_per_s": len(requests) / best if best > 0 else float("inf"),
    }


def format_table(result: Mapping[str, Any]) -> Table:
    """The figures of a `run` result as a table."""
    p, single, batch = result["params"], result["single"], result["batch"]
    table = Table(
        title=(
            f"Placement: {p['clusters']:,} clusters x {p['nodes']} nodes "
            f"({p['clusters'] * p['nodes']:,} nodes), seed {p['seed']}"
        ),
        header_style="bold",
        title_justify="left",
    )
    table.add_column("FIGURE")
    table.add_column("VALUE", justify="right")
    table.add_column("HOW", style="dim")
    how = (
        f"views + place_batch([job]) + reserve, {single['jobs']:,} jobs ({single['placed']:,} placed), "
        f"{p['reports']} inventory reports between placements"
    )
    for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max")):
        table.add_row(f"single-job latency {label}", f"{single[key]:,.2f} ms", how)
        how = ""
    table.add_row(
        "single-job CPU time p50 / p99",
        f"{single['cpu_p50_ms']:,.2f} / {single['cpu_p99_ms']:,.2f} ms",
        "thread CPU time of the same cycles (excludes waiting for a CPU on a busy machine)",
    )
    table.add_row(
        "full GCs while placing single jobs",
        f"{single['full_gc']:,}",
        f"{single['full_gc_ms']:,.1f} ms in all: Python pauses that land in the latencies",
    )
    table.add_row(
        "batch throughput",
        f"{batch['jobs_per_s']:,.0f} jobs/s",
        f"views + place_batch of {batch['jobs']:,} jobs ({batch['placed']:,} placed): "
        f"best {batch['best_s']:.3f}s, median {batch['median_s']:.3f}s of {p['repeat']}",
    )
    table.add_row(
        "first views (cold)",
        f"{result['cold_views_ms']:,.1f} ms",
        "every cluster's view built from its inventory message",
    )
    return table
