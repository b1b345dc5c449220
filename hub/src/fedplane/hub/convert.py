"""Translation between the wire messages and the core's plain data (records.py builds on it to
write the state machine's transitions into the stored status)."""

from __future__ import annotations

from collections.abc import Iterable

from fedplane.core import model
from fedplane.core.placement import Score, Verdict
from fedplane.v1 import types_pb2 as pb


def job_request(job: pb.Job, seq: int) -> model.JobRequest:
    spec = job.spec
    c = spec.constraints
    return model.JobRequest(
        id=job.id,
        pod_sets=tuple(
            model.PodSetRequest(
                name=p.name,
                count=p.count,
                min_count=p.min_count,
                requests=dict(p.requests.quantities),
                gpu_type=p.gpu_type,
            )
            for p in spec.pod_sets
        ),
        priority=spec.priority,
        seq=seq,
        cluster_selector=dict(c.cluster_selector),
        tolerations=tuple(
            model.Toleration(t.key, t.operator or "Equal", t.value, t.effect) for t in c.tolerations
        ),
        groups=tuple(
            model.ClusterGroup(frozenset(g.clusters), dict(g.match_labels)) for g in c.preferred_groups
        ),
        strict_groups=c.strict_groups,
        datasets=tuple(model.DatasetRequest(d.id, d.size_bytes, d.required) for d in spec.datasets),
        queue=spec.queue,
    )


def taints(items: Iterable[pb.Taint]) -> tuple[model.Taint, ...]:
    return tuple(model.Taint(t.key, t.value, t.effect or "NoSchedule") for t in items)


def node_view(node: pb.Node) -> model.NodeView:
    # Comprehensions over the maps: dict(map) goes through the Mapping ABC and costs twice as much,
    # and inventories of large clusters are converted often.
    free = node.free.quantities
    allocatable = node.allocatable.quantities
    labels = node.labels
    return model.NodeView(
        node.name,
        {k: free[k] for k in free},
        {k: allocatable[k] for k in allocatable},
        {k: labels[k] for k in labels} if len(labels) else {},
        taints(node.taints) if len(node.taints) else (),
        node.ready and not node.unschedulable,
    )


def score_pb(score: Score) -> pb.ScoreBreakdown:
    return pb.ScoreBreakdown(
        total=score.total,
        data_locality=score.data_locality,
        headroom=score.headroom,
        cost=score.cost,
        preference=score.preference,
    )


def assignments_pb(assignments: Iterable[model.Assignment]) -> list[pb.NodeAssignment]:
    return [pb.NodeAssignment(pod_set=a.pod_set, node=a.node, count=a.count) for a in assignments]


def assignments_core(assignments: Iterable[pb.NodeAssignment]) -> list[model.Assignment]:
    return [model.Assignment(a.pod_set, a.node, a.count) for a in assignments]


def verdict_pb(verdict: Verdict) -> pb.ClusterVerdict:
    return pb.ClusterVerdict(
        cluster=verdict.cluster,
        feasible=verdict.feasible,
        reasons=verdict.reasons,
        score=score_pb(verdict.score),
        group_rank=verdict.group_rank,
        assignments=assignments_pb(verdict.assignments),
    )
