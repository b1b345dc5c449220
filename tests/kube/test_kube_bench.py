"""`fedplane bench --backend kubernetes` at a small size: one real member cluster, 200 jobs.

The check is made outside the bench's own figures: the hub's accepted jobs and the Jobs listed
from the member apiserver by the fedplane job label must match one to one, so a bench that
measured nothing (or created a workload twice) fails here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

from fedplane.agent.kubernetes_backend import LABEL_JOB, job_label_value
from fedplane.bench import federation, loadgen
from fedplane.client.sdk import FedplaneClient
from fedplane.local.kubeapiserver import KubeAPIServer

JOBS = 200


async def test_every_job_gets_exactly_one_workload_in_its_cluster() -> None:
    params = federation.BenchParams(
        backend="kubernetes", clusters=1, nodes=2, node_cpu=128, jobs=JOBS, heartbeat=1.0, timeout=60.0
    )
    seen: dict[str, Any] = {}

    async def inspect(result: dict[str, Any], members: Mapping[str, KubeAPIServer]) -> None:
        run = result["results"]
        async with FedplaneClient(run["hub"], interceptors=[]) as client:
            placed = {
                job.id: job.status.cluster
                async for page in client.pages(labels={loadgen.RUN_LABEL: run["run_id"]})
                for job in page.jobs
            }
        (name, server), *_ = members.items()
        listed = await asyncio.to_thread(
            server.request, "get", f"/apis/batch/v1/jobs?labelSelector={LABEL_JOB}"
        )
        seen["placed"] = placed
        seen["cluster"] = name
        seen["jobs"] = Counter(item["metadata"]["labels"][LABEL_JOB] for item in listed["items"])

    result = await federation.run_async(params, inspect=inspect)

    run = result["results"]
    assert run["jobs_accepted"] == JOBS and not run["timed_out"] and not run["submit_errors"]
    placed: dict[str, str] = seen["placed"]
    assert len(placed) == JOBS
    assert set(placed.values()) == {seen["cluster"]}
    jobs: Counter[str] = seen["jobs"]
    assert {job_label_value(job_id) for job_id in placed} == set(jobs)
    assert set(jobs.values()) == {1}, [job for job, count in jobs.items() if count > 1][:5]
    # The bench's own figures agree, and it timed every workload's creation.
    workloads = result["workloads"]
    assert (workloads["created"], workloads["duplicated"], workloads["missing"]) == (JOBS, 0, 0)
    assert workloads["watch_errors"] == {}
    assert run["latency_ms"]["submit_to_workload_created"]["count"] == JOBS
    assert {"agent-0", "kube-apiserver-0", "kube-etcd-0"} <= set(result["resources"])
    assert result["memory"]["peak_rss_sum_bytes"] > 0


def test_kubernetes_backend_parameters_are_checked_up_front() -> None:
    def problems(**changes: Any) -> str:
        return "; ".join(federation.BenchParams(jobs=10, nodes=2, **changes).problems())

    assert "--backend: one of simulated, kubernetes" in problems(backend="kube")
    assert "--clusters: at most 10 with --backend kubernetes" in problems(backend="kubernetes", clusters=11)
    assert "--queued: not supported" in problems(backend="kubernetes", clusters=1, queued=5)
    assert problems(backend="kubernetes", clusters=3) == ""
