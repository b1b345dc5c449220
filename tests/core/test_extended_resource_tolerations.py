"""GPU nodes tainted nvidia.com/gpu keep CPU-only pods off, while GPU pods pass without a toleration."""

from __future__ import annotations

from fedplane.core.model import ClusterView, JobRequest, NodeView, PodSetRequest, Taint, Toleration
from fedplane.core.placement import evaluate, place_batch

GPU = "nvidia.com/gpu"


def cluster() -> ClusterView:
    gpu_node = NodeView(
        "gpu-0", {"cpu": 96000, GPU: 8}, {"cpu": 96000, GPU: 8}, taints=(Taint(GPU, "present", "NoSchedule"),)
    )
    cpu_node = NodeView("cpu-0", {"cpu": 8000}, {"cpu": 8000})
    return ClusterView("mixed", [gpu_node, cpu_node])


def job(
    name: str, requests: dict[str, int], count: int = 1, tolerations: tuple[Toleration, ...] = ()
) -> JobRequest:
    return JobRequest(name, (PodSetRequest("main", count, 0, requests),), tolerations=tolerations)


def test_gpu_pods_tolerate_the_gpu_taint_implicitly() -> None:
    (decision,) = place_batch([job("train", {"cpu": 1000, GPU: 2})], [cluster()])
    assert decision.cluster == "mixed"
    assert [a.node for a in decision.verdicts[0].assignments] == ["gpu-0"]


def test_cpu_only_pods_stay_off_tainted_gpu_nodes() -> None:
    (verdict,) = evaluate(job("etl", {"cpu": 4000}, count=4), [cluster()])
    assert not verdict.feasible
    assert "unschedulable or untolerated taint" in verdict.reasons[0]


def test_an_explicit_toleration_lets_cpu_work_borrow_gpu_nodes() -> None:
    tolerate = (Toleration(GPU, "Exists", "", "NoSchedule"),)
    (decision,) = place_batch([job("render", {"cpu": 4000}, count=4, tolerations=tolerate)], [cluster()])
    assert decision.cluster == "mixed"
    assert sum(a.count for a in decision.verdicts[0].assignments) == 4
